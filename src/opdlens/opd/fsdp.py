"""FSDP2 for the student (``parallel: fsdp``): sharding, and whole-tensor checkpoints.

:func:`shard` applies torch's ``fully_shard`` to every decoder layer and then to the root (the
embeddings, final norm and LM head, tied or not, form the root's group). :func:`full_state`
gathers the weights and the AdamW state to whole tensors in the single-process layout (optimizer
state keyed by parameter index, as ``optimizer.state_dict()``), so :mod:`opdlens.opd.checkpoint`
writes the same files under DDP and FSDP; :func:`load_full_state` shards them back on any number
of processes. Every function here is a collective: every process calls it, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        from opdlens.errors import OpdlensError

        raise OpdlensError(
            f"parallel: fsdp shards the decoder layers of a Hugging Face causal LM (model.model.layers); "
            f"{type(model).__name__} has none: use parallel: ddp"
        )
    return list(layers)


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """``dropped name -> kept name`` for state-dict entries sharing storage (tied embeddings), by
    safetensors' rule (the alphabetically first name is written). Call it before sharding."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict().items():
        groups.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    out = {}
    for names in groups.values():
        keep = sorted(names)[0]
        out.update({n: keep for n in names if n != keep})
    return out


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` in place over the default process group (float32 throughout: the forward's
    bf16 comes from autocast, as under DDP) and return it."""
    from torch.distributed.fsdp import fully_shard

    model._opd_tied = tied_names(model)  # type: ignore[assignment]
    model.to(device)
    for layer in _layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def _trainable(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Whole weights (tied duplicates dropped, as ``safetensors.save_model``) and the whole
    optimizer state keyed by parameter index; complete on the main process (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    tied = getattr(model, "_opd_tied", {})
    tensors = {k: v.contiguous() for k, v in sd.items() if k not in tied}
    if not osd:
        return tensors, {}
    index = {n: i for i, n in enumerate(_trainable(model))}
    state = {index[k]: v for k, v in osd["state"].items()}
    groups = [{**g, "params": [index[p] for p in g["params"]]} for g in osd["param_groups"]]
    return tensors, {"state": state, "param_groups": groups}


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    tensors: dict[str, torch.Tensor],
    optim_state: dict[str, Any] | None,
) -> None:
    """Shard whole weights (and optimizer state in the index layout) into the FSDP model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    tied = getattr(model, "_opd_tied", {})
    full = dict(tensors)
    for dropped, kept in tied.items():
        if dropped not in full and kept in full:
            full[dropped] = full[kept]
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, full, options=opts)
    if optimizer is not None and optim_state is not None:
        names = _trainable(model)
        osd = {
            "state": {names[int(i)]: v for i, v in optim_state["state"].items()},
            "param_groups": [
                {**g, "params": [names[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]
            ],
        }
        set_optimizer_state_dict(model, optimizer, osd, options=opts)
