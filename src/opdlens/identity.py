"""Run identity, shared by ``opdlens diagnose`` and ``opdlens train``: which configuration values
determine a run's results (:func:`result_keys`: every key but a config class's
``NON_RESULT_KEYS``), their fingerprint, the values of keys added since an older run was written
(``LEGACY_VALUES``), and the digests of the inputs (local models' contents, hub revisions) that a
resumed run must share with the stored one (``fingerprint.json``)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from opdlens.errors import OpdlensError


# ---------------------------------------------------------------------- run identity
def with_legacy_values(stored: dict[str, Any], legacy: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """A stored run configuration (``config.yaml`` or the fingerprint's keys) with the keys it
    lacks of ``legacy`` (a config class's ``LEGACY_VALUES``, ``(section, key)`` or ``("", key)`` for a
    top-level key: keys added, or whose default changed,
    after a run was written, with the value that run used) set to those values."""
    out = dict(stored)
    for (section, key), value in legacy.items():
        if not section:  # a top-level key
            out.setdefault(key, value)
        elif isinstance(out.get(section), dict) and key not in out[section]:
            out[section] = {**out[section], key: value}
    return out


def result_keys(config: BaseModel) -> dict[str, Any]:
    """The configuration values that determine a run's results (JSON-able): every key but the
    config class's ``NON_RESULT_KEYS`` (where it runs and how fast, where it writes)."""
    skip = getattr(type(config), "NON_RESULT_KEYS", frozenset())
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in skip}


def fingerprint(keys: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``keys``."""
    return hashlib.sha256(json.dumps(keys, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the values that differ between two JSON-like trees (``teachers[1].model``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(name)
            else:
                out += differing_keys(old[k], new[k], name)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [x for i, (a, b) in enumerate(zip(old, new)) for x in differing_keys(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [prefix or "(root)"]


def value_at(tree: Any, dotted: str) -> Any:
    """The value at a :func:`differing_keys` name (``teachers[1].model``), or ``<missing>``."""
    cur = tree
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        try:
            cur = cur[int(part[1:-1])] if part.startswith("[") else cur[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return cur


def describe_mismatch(stored: dict[str, Any], keys: dict[str, Any], limit: int = 8) -> str | None:
    """``"key: old -> new; ..."`` for the result keys that differ, or None when the fingerprints match."""
    if fingerprint(stored) == fingerprint(keys):
        return None
    diff = differing_keys(stored, keys)
    shown = "; ".join(f"{k}: {value_at(stored, k)!r} -> {value_at(keys, k)!r}" for k in diff[:limit])
    return shown + (f" (and {len(diff) - limit} more)" if len(diff) > limit else "")


def stored_result_keys(root: str | Path, cls: type[BaseModel]) -> dict[str, Any] | None:
    """The result keys a run directory was written with (``fingerprint.json``, else an older
    run's ``config.yaml``), keys added to ``cls`` since then filled with their defaults; None if
    neither file exists."""
    fp_file, cfg_file = Path(root) / "fingerprint.json", Path(root) / "config.yaml"
    try:
        if fp_file.exists():
            stored = json.loads(fp_file.read_text(encoding="utf-8"))["keys"]
        elif cfg_file.exists():
            stored = {
                k: v
                for k, v in (yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}).items()
                if k not in getattr(cls, "NON_RESULT_KEYS", frozenset())
            }
        else:
            return None
        if not isinstance(stored, dict):
            raise TypeError("not a mapping")
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise OpdlensError(
            f"cannot read the stored configuration of {root} ({type(exc).__name__}: {exc}): "
            "pass --fresh to move the old run aside and start afresh"
        ) from None
    stored = with_legacy_values(stored, getattr(cls, "LEGACY_VALUES", {}))
    defaults = result_keys(cls())
    merged = {k: stored.get(k, defaults.get(k)) for k in set(defaults) | set(stored)}
    for k, d in defaults.items():
        if isinstance(d, dict) and isinstance(merged[k], dict):
            merged[k] = {**d, **merged[k]}
    return merged


# ---------------------------------------------------------------------- input identity
#: Weight files of a local model directory: their size, the safetensors header (tensor names,
#: dtypes, shapes, offsets) and :data:`_SAMPLES` blocks of their bytes enter its digest.
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack"})
#: Small files of a model directory hashed whole: configuration, tokenizer, chat template, code.
_SMALL_SUFFIXES = frozenset({".json", ".jinja", ".txt", ".model", ".tiktoken", ".py", ".yaml"})
_SAMPLES, _BLOCK = 16, 1 << 16


def _weights_digest(h: Any, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        start = 0
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(f.read(8), "little")
            start = 8 + min(n, size - 8)
            h.update(f.read(start - 8))  # the header: names, dtypes, shapes, offsets, metadata
        span = size - start
        for i in range(_SAMPLES if span > 0 else 0):  # blocks spread evenly over the tensor bytes
            f.seek(start + span * i // _SAMPLES)
            h.update(f.read(_BLOCK))


def model_digest(spec: str | None) -> str | None:
    """What identifies the contents of a model spec, for the run fingerprint (None: nothing to add).

    * a local directory: SHA-256 (first 16 hex digits) over its configuration, tokenizer and
      chat-template files (whole) and, per weight file, its size, its safetensors header and 16
      blocks of 64 KiB spread over its tensor bytes. No modification times (a copy or ``touch``
      keeps the digest) and about 1 MiB read per weight file, not the whole weights: replacing
      the weights (another model, a further fine-tuned checkpoint) changes it, an edit that
      touches none of the sampled bytes and keeps every size would not;
    * a hub id: ``<id>@<commit>`` of the snapshot in the local Hugging Face cache, when one is
      cached (the revision that would load), else None (the id, in the config, is all we know);
    * ``smollm2``, ``random:...`` and other built-in specs: None (the package version fixes them).
    """
    if not spec:
        return None
    p = Path(spec)
    if p.is_dir():
        h = hashlib.sha256()
        try:
            for f in sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith(".")):
                if f.suffix in _WEIGHT_SUFFIXES:
                    _weights_digest(h, f)
                elif f.suffix in _SMALL_SUFFIXES:
                    h.update(f"{f.name}\0".encode() + hashlib.sha256(f.read_bytes()).digest())
        except OSError as exc:
            raise OpdlensError(f"cannot read model directory {p} ({exc.strerror}): check its permissions") from None
        return h.hexdigest()[:16]
    if p.exists() or spec.count("/") > 1 or spec.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except Exception:  # not a valid repo id, no cache: nothing known
        return None
    if not isinstance(cached, str):
        return None
    commit = Path(cached).parent.name  # .../snapshots/<commit>/config.json
    return f"{spec}@{commit}"


def model_digests(specs: Any) -> dict[str, str]:
    """``{"model <spec>": digest}`` of the specs with a :func:`model_digest` (None entries skipped)."""
    out: dict[str, str] = {}
    for spec in specs:
        if spec and f"model {spec}" not in out and (d := model_digest(spec)) is not None:
            out[f"model {spec}"] = d
    return out


def stored_inputs(root: str | Path) -> dict[str, str]:
    """The input digests a run directory's ``fingerprint.json`` holds (``{}`` for none, e.g. a run
    written before they were recorded)."""
    f = Path(root) / "fingerprint.json"
    try:
        inputs = json.loads(f.read_text(encoding="utf-8")).get("inputs", {}) if f.is_file() else {}
    except (OSError, ValueError, AttributeError):
        return {}  # stored_result_keys reports an unreadable fingerprint.json
    return {str(k): str(v) for k, v in inputs.items()} if isinstance(inputs, dict) else {}


def describe_input_changes(stored: dict[str, str], inputs: dict[str, str]) -> str | None:
    """``"model X: contents changed (a -> b); ..."`` for the inputs recorded on both sides whose
    digests differ, or None. An input recorded on one side only (a run written before digests
    were kept, a hub model not cached then) cannot be compared and is not a change."""
    changed = [k for k in sorted(set(stored) & set(inputs)) if stored[k] != inputs[k]]
    if not changed:
        return None
    return "; ".join(f"{k}: contents changed ({stored[k]} -> {inputs[k]})" for k in changed)


def fingerprint_record(keys: dict[str, Any], inputs: dict[str, str]) -> str:
    """The text of ``fingerprint.json``: the result keys, their fingerprint and the input digests."""
    return json.dumps({"fingerprint": fingerprint(keys), "keys": keys, "inputs": inputs}, indent=1)
