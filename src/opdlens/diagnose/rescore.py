"""``opdlens rescore``: a finished run's tree scored again under other scoring choices.

A run's tree (initial and targeted rollouts, representative paths, the texts shown to the
teachers) does not depend on how its nodes are scored. ``rescore`` copies the tree of a finished
run into a new run directory and runs phase 2 alone on it (the per-node signals of every teacher)
under changed :data:`SCORING_KEYS`: the signal definitions, the tree accounting and the statistical
unit. Nothing is sampled, so the two runs compare scoring choices on the same rollouts (e.g. paper
A's protocol against ours: ``opdlens rescore RUN --scoring opdlens --out RUN-ours``).

The new run's ``rescored.json`` names its source and the keys that changed; its report says so.
An interrupted rescore resumes with the same command.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from opdlens.config import apply_overrides, set_overrides, validate_config
from opdlens.diagnose.config import DiagnoseConfig, read_run_config
from opdlens.diagnose.store import RunStore, is_run_dir, start_fresh
from opdlens.errors import OpdlensError
from opdlens.identity import differing_keys, fingerprint, result_keys, value_at
from opdlens.io import atomic_write

#: Top-level config keys whose change leaves the tree as it is (how nodes are scored, counted
#: and summarised). Every other result key decides which rollouts exist.
SCORING_KEYS: tuple[str, ...] = ("signals", "tree_accounting", "stat_unit")

#: The file a rescored run keeps beside its config: the source and the changed keys.
RESCORED_FILE = "rescored.json"

#: Keys that change no result key but the precision of the scoring forwards (the model dtype
#: defaults to bf16 on CUDA and float32 on a CPU): the report says when they differ from the source's.
_RUNTIME_KEYS = ("device", "dtype")

#: What of a source run is not copied: phase 2's results, the report and the run's own identity.
_NOT_COPIED = frozenset(
    {"nodes", "report", "config.yaml", "fingerprint.json", "questions.parquet", "skips.parquet", RESCORED_FILE}
)


def _top_key(dotted: str) -> str:
    return dotted.split(".")[0].split("[")[0]


def rescore_config(
    source: str | Path,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    scoring: Literal["paper", "opdlens"] | None = None,
) -> tuple[DiagnoseConfig, DiagnoseConfig, list[str]]:
    """The source run's configuration, the rescored run's and the dotted keys that differ.

    ``scoring``: every :data:`SCORING_KEYS` value set to that protocol's (``protocol: paper``'s
    preset, or opdlens' defaults) before ``overrides`` (``KEY=VALUE``) apply. A change outside
    :data:`SCORING_KEYS` is an error naming it (it would need other rollouts)."""
    cfg_file = Path(source) / "config.yaml"
    if not cfg_file.is_file():
        raise OpdlensError(f"{source} has no config.yaml: rescore needs a run written by `opdlens diagnose`")
    old = read_run_config(cfg_file)
    data = old.model_dump(mode="json")
    if scoring is not None:
        ref = DiagnoseConfig(protocol=scoring).model_dump(mode="json")
        for key in SCORING_KEYS:
            data[key] = ref[key]
    data = apply_overrides(data, overrides, DiagnoseConfig)
    data["out_dir"] = str(out_dir)
    new = set_overrides(validate_config(DiagnoseConfig, data, "opdlens rescore"), list(overrides))
    tree = [k for k in differing_keys(result_keys(old), result_keys(new)) if _top_key(k) not in SCORING_KEYS]
    if tree:
        raise OpdlensError(
            f"rescore changes only how the stored tree is scored ({', '.join(SCORING_KEYS)}); "
            f"{', '.join(tree)} would need other rollouts: run `opdlens diagnose` with that setting instead"
        )
    a, b = (c.model_dump(mode="json") for c in (old, new))
    changed = differing_keys({k: a[k] for k in SCORING_KEYS}, {k: b[k] for k in SCORING_KEYS})
    return old, new, changed


def _finished_questions(src: RunStore) -> list[str]:
    """The source's question ids, each with a stored tree; an error if the run is not finished."""
    if not src.has("questions.parquet") or not src.has("inputs.parquet"):
        raise OpdlensError(
            f"run {src.root} is not finished (no questions.parquet): finish it with the same "
            "`opdlens diagnose` command first, then rescore it"
        )
    wanted = [str(q) for q in src.read_table("inputs.parquet")["question_id"]]
    done = {str(q) for q in src.read_table("questions.parquet")["question_id"]}
    skipped = set()
    if src.has("skips.parquet"):
        sk = src.read_table("skips.parquet")
        skipped = {str(q) for q, t in zip(sk["question_id"], sk["teacher"]) if str(t) == ""}
    missing = [q for q in wanted if q not in done and q not in skipped]
    if missing:
        raise OpdlensError(
            f"run {src.root} has {len(missing)} unfinished question(s) ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): finish it with `opdlens diagnose` first"
        )
    return [q for q in wanted if q in done]


def copy_tree(src: RunStore, dst: Path) -> int:
    """Copy every file of the source's tree (all but :data:`_NOT_COPIED` and hidden files) into
    ``dst`` through the atomic writer; returns the number of files. A link is an error."""
    n = 0
    for f in sorted(src.root.rglob("*")):
        rel = f.relative_to(src.root)
        if rel.parts[0] in _NOT_COPIED or any(p.startswith(".") for p in rel.parts):
            continue
        if f.is_symlink():
            raise OpdlensError(f"{f} is a symbolic link: rescore copies the files of a run directory, not links")
        if f.is_file():
            atomic_write(dst / rel, f.read_bytes())
            n += 1
    return n


def _record(source: Path, old: DiagnoseConfig, new: DiagnoseConfig, changed: list[str]) -> dict[str, Any]:
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    return {
        "source": str(source.resolve()),
        "source_fingerprint": fingerprint(result_keys(old)),
        "changed": {k: [value_at(a, k), value_at(b, k)] for k in changed},
        "runtime": {k: [a[k], b[k]] for k in _RUNTIME_KEYS if a[k] != b[k]},
    }


def rescore(
    source: str | Path,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    scoring: Literal["paper", "opdlens"] | None = None,
    fresh: bool = False,
    progress: bool = True,
) -> RunStore:
    """Score the tree of the finished run ``source`` again into ``out_dir`` (see the module
    docstring); ``fresh`` moves an existing ``out_dir`` aside first. A rescore of the same source
    with the same keys resumes; anything else already in ``out_dir`` is an error."""
    from opdlens.diagnose import run as drun

    source, out = Path(source), Path(out_dir)
    if not is_run_dir(source):
        raise OpdlensError(f"{source} is not a run directory (no rollouts or results in it)")
    if out.resolve() == source.resolve():
        raise OpdlensError("rescore writes a new run: give --out another directory than the source")
    old, new, changed = rescore_config(source, out, overrides, scoring)
    src = RunStore(source, create=False)
    questions = _finished_questions(src)
    record = _record(source, old, new, changed)
    if fresh:
        start_fresh(out)
    if out.exists() and any(out.iterdir()):
        try:
            stored = json.loads((out / RESCORED_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = None
        if stored != record:
            raise OpdlensError(
                f"{out} already holds another run: choose another --out, or pass --fresh to move it aside"
            )
    store = RunStore(out)
    store.check_writable()
    with store.lock():
        copy_tree(src, out)
        drun.write_config(store, new)
        store.write_text(RESCORED_FILE, json.dumps(record, indent=1, default=str))
        diag, envs = drun.build_diagnosis(new, progress=progress)
        keep = set(questions)
        envs = [e for e in envs if e.id in keep]
        inputs = drun.inputs_frame(envs)
        drun.check_questions(store, inputs, [t.spec.name for t in diag.teachers])
        diag.score_stored(envs)
    return store


def rescored_note(root: str | Path) -> str | None:
    """The report's line for a rescored run (None for any other run)."""
    f = Path(root) / RESCORED_FILE
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
        changed = rec.get("changed", {})
        source = rec["source"]
    except (OSError, ValueError, KeyError, AttributeError):
        return f"Scored again with `opdlens rescore` ({RESCORED_FILE} unreadable)."
    what = "; ".join(f"`{k}`: {_short(v[0])} → {_short(v[1])}" for k, v in changed.items()) or "none"
    note = (
        f"Scored again with `opdlens rescore` on the tree of run {source} (the same rollouts, paths and "
        f"teacher contexts; nothing sampled). Changed scoring choices: {what}."
    )
    runtime = rec.get("runtime") or {}
    if runtime:
        where = "; ".join(f"`{k}`: {_short(v[0])} → {_short(v[1])}" for k, v in runtime.items())
        note += (
            f" Scored on other hardware or precision than the source ({where}): node values differ by the "
            "forwards' precision too (bf16 against float32 flipped 2 % of node signs on the SmolLM2 study, "
            "docs/RESULTS.md); compare runs scored alike."
        )
    return note


def _short(v: Any) -> str:
    return "null" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)
