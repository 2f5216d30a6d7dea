"""Checkpoints that never execute code: tensors in safetensors, everything else in JSON.

``out_dir/checkpoints/step_XXXXXXX/`` holds

* ``model.safetensors``: the student's weights (:func:`safetensors.torch.save_model`, which
  handles tied weights);
* ``optimizer.safetensors``: every tensor of the optimizer state, keyed ``"{param}.{name}"``;
* ``rng.safetensors``: the torch (and CUDA) generator states;
* ``state.json``: step, optimizer hyper-parameters and non-tensor state, NumPy/Python RNG
  states, the run config. Written last (atomically): a directory without it is incomplete
  and ignored;
* the Hugging Face files around ``model.safetensors`` (:func:`write_hf_files`): ``config.json``,
  ``generation_config.json``, the tokenizer's files and ``model.safetensors.index.json``, so the
  checkpoint directory itself is a model directory: ``student: runs/x/checkpoints/step_0000200``
  in a diagnose config, ``AutoModelForCausalLM.from_pretrained``, vLLM. The weights are not
  written twice: ``model.safetensors`` (the student's float32 weights under their state-dict
  names, one of two tied tensors dropped, which Hugging Face ties back on load) is both the
  resume state and the model's weights; the index lists it alone, so a loader that globs
  ``*.safetensors`` (vLLM) does not take the optimizer and RNG files for weights.

Nothing here unpickles: a ``state.pt`` (our old pickle format, or a planted file) is refused
with an error, since loading a pickle can run arbitrary code.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from opdlens.errors import OpdlensError
from opdlens.io import atomic_write

CKPT_DIR = "checkpoints"
STATE = "state.json"
MODEL = "model.safetensors"
OPTIM = "optimizer.safetensors"
RNG = "rng.safetensors"
PICKLE = "state.pt"
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``out_dir``, oldest first."""
    root = Path(out_dir) / CKPT_DIR
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = re.fullmatch(r"step_(\d+)", d.name)
            if m and ((d / STATE).is_file() or (d / PICKLE).is_file()):
                found.append((int(m.group(1)), d))
    return sorted(found)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    meta = {
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, st in state["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{name}"] = v.detach().contiguous().cpu()
            else:
                plain.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, vals in meta["plain"].items():
        state.setdefault(int(pid), {}).update(vals)
    # JSON has no tuples: hyper-parameters such as AdamW's betas come back as tuples
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def write_hf_files(d: Path, model: torch.nn.Module, tokenizer: Any | None) -> None:
    """Make checkpoint directory ``d`` (its ``model.safetensors`` written) a Hugging Face model
    directory: the model's ``config.json`` (dtype: the stored weights'), ``generation_config.json``,
    the tokenizer's files and a ``model.safetensors.index.json`` naming ``model.safetensors`` alone.
    Every file through :func:`atomic_write` (the tokenizer is saved into a temporary folder first)."""
    import copy
    import tempfile

    from safetensors import safe_open

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise OpdlensError(
            f"the student ({type(model).__name__}) has no Hugging Face config to write beside its weights"
        )
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the weights are plain tensors
    with safe_open(str(d / MODEL), framework="pt") as f:
        names = sorted(f.keys())
        stored = {f.get_slice(n).get_dtype() for n in names}
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    if len(stored) == 1 and (dtype := dtypes.get(stored.pop())) is not None:
        cfg.dtype = dtype  # what from_pretrained(dtype="auto") loads: the stored (master) weights' precision
    atomic_write(d / HF_CONFIG, cfg.to_json_string())
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_string"):
        atomic_write(d / "generation_config.json", generation.to_json_string())
    size = (d / MODEL).stat().st_size
    index = {"metadata": {"total_size": size}, "weight_map": dict.fromkeys(names, MODEL)}
    atomic_write(d / HF_INDEX, json.dumps(index, indent=1))
    if tokenizer is not None:
        tmp = Path(tempfile.mkdtemp(dir=d, prefix=".tmp-tokenizer-"))
        try:
            tokenizer.save_pretrained(str(tmp))
            for f in sorted(tmp.iterdir()):
                if f.is_file():
                    atomic_write(d / f.name, f.read_bytes())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    keep: int = 2,
    full: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    tokenizer: Any | None = None,
) -> Path:
    """Write the checkpoint of ``step``; keep the newest ``keep`` (0: all). ``full``: the whole
    weights and optimizer state gathered from FSDP shards (:func:`opdlens.opd.fsdp.full_state`),
    written in the same layout as an unsharded model's. The directory is also a Hugging Face
    model directory (:func:`write_hf_files`, with ``tokenizer``'s files when given)."""
    d = Path(out_dir) / CKPT_DIR / f"step_{step:07d}"
    d.mkdir(parents=True, exist_ok=True)
    (d / STATE).unlink(missing_ok=True)  # incomplete until state.json is back
    # every file through opdlens.io.atomic_write: complete or absent, never written through a link
    if full is None:
        atomic_write(d / MODEL, lambda tmp: save_model(model, str(tmp)))
    else:
        weights = full[0]  # whole tensors gathered from the shards (opdlens.opd.fsdp)
        atomic_write(d / MODEL, lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict() if full is None else full[1])
    atomic_write(d / OPTIM, lambda tmp: save_file(opt_tensors, str(tmp)))
    rng_tensors, rng_meta = _rng_state()
    atomic_write(d / RNG, lambda tmp: save_file(rng_tensors, str(tmp)))
    write_hf_files(d, model, tokenizer)
    atomic_write(d / STATE, json.dumps({"step": step, "optimizer": opt_meta, "rng": rng_meta, "config": config}))
    if keep > 0:
        for _, old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return d


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    loader: Callable[[dict[str, torch.Tensor], dict[str, Any] | None], None] | None = None,
) -> int:
    """Restore model, optimizer and RNG states from a checkpoint directory; returns its step.
    ``loader(weights, optimizer_state)`` puts whole tensors into a sharded model instead
    (:func:`opdlens.opd.fsdp.load_full_state`)."""
    d = Path(path)
    if d.name in (STATE, PICKLE, MODEL):
        d = d.parent
    if (d / PICKLE).exists() and not (d / STATE).exists():
        raise OpdlensError(
            f"{d / PICKLE} is a pickle checkpoint: opdlens does not load pickles (they can run arbitrary code). "
            "If it is yours, from an older opdlens, delete the checkpoints folder and start the run again"
        )
    if not (d / STATE).is_file():
        raise OpdlensError(f"checkpoint {d} not found or incomplete (no {STATE})")
    try:
        meta = json.loads((d / STATE).read_text())
        step = int(meta["step"])
        if loader is not None:
            osd = _join_optimizer(load_file(str(d / OPTIM)), meta["optimizer"]) if optimizer is not None else None
            loader(load_file(str(d / MODEL)), osd)
        else:
            missing, unexpected = load_model(model, str(d / MODEL), strict=False)
            if missing or unexpected:
                raise OpdlensError(
                    f"checkpoint {d} does not match the student model (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}): was it written for another model?"
                )
            if optimizer is not None:
                optimizer.load_state_dict(_join_optimizer(load_file(str(d / OPTIM)), meta["optimizer"]))
        _set_rng_state(load_file(str(d / RNG)), meta["rng"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise OpdlensError(
            f"checkpoint {d} is corrupt or not an opdlens checkpoint ({type(e).__name__}: {e}); "
            "delete it to resume from an earlier one"
        ) from e
    return step
