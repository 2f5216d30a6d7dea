"""The run store: Parquet files under one run directory, written atomically, resumable.

Layout::

    RUN/
      config.yaml                         the run's configuration (written once)
      rollouts/<question>/<chunk>.parquet one file per sampling chunk (initial, targeted-<i>)
      paths/<question>.parquet            the representative paths of a question
      nodes/<teacher>/<question>.parquet  per-node signals of a (teacher, question)
      phase1/<question>.parquet           marks a question's tree as complete (Ray runs)
      questions.parquet                   per-question summary (rollouts, success rate, answers not found)
      skips.parquet                       recorded skips: (question, teacher, reason)

A chunk file exists only once its rollouts are complete (write to a temporary name, then
rename), so a run interrupted at any moment loses at most the chunk in flight; rerunning skips
every chunk already on disk. Chunk seeds derive from (run seed, question, chunk name) alone, so
a resumed run produces exactly the rollouts an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Literal, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from opdlens.policy import OpdlensError
from opdlens.tree import RolloutSet

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A file-name-safe version of an id (stable, collision-resistant)."""
    clean = _SAFE.sub("_", name)[:80]
    if clean != name:
        clean += "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return clean


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed determined by the run seed and the names of what is being sampled."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")  # unique across nodes
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class RunStore:
    """Read/write access to one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- rollouts
    def _chunk_path(self, question: str, chunk: str) -> Path:
        return self.root / "rollouts" / safe_name(question) / f"{safe_name(chunk)}.parquet"

    def has_chunk(self, question: str, chunk: str) -> bool:
        return self._chunk_path(question, chunk).exists()

    def write_chunk(self, question: str, chunk: str, rollouts: RolloutSet) -> None:
        table = pa.table(
            {
                "tokens": pa.array([t.tolist() for t in rollouts.tokens], type=pa.list_(pa.int32())),
                "success": pa.array(rollouts.success, type=pa.bool_()),
                "forced": pa.array(rollouts.forced, type=pa.int32()),
            }
        )
        _write_atomic(table, self._chunk_path(question, chunk))

    def read_chunk(self, question: str, chunk: str) -> RolloutSet:
        t = pq.read_table(self._chunk_path(question, chunk))
        tokens = [np.asarray(x, dtype=np.int64) for x in t.column("tokens").to_pylist()]
        return RolloutSet(tokens, t.column("success").to_numpy().astype(bool), t.column("forced").to_numpy().astype(np.int64))

    @overload
    def read_rollouts(self, question: str, prefix: str = "", *, missing_ok: Literal[False] = False) -> RolloutSet: ...
    @overload
    def read_rollouts(self, question: str, prefix: str = "", *, missing_ok: bool) -> RolloutSet | None: ...
    def read_rollouts(self, question: str, prefix: str = "", *, missing_ok: bool = False) -> RolloutSet | None:
        """The finished chunks of a question whose names start with ``prefix`` (all by default),
        initial first, then targeted in name order. None if there are none and ``missing_ok``."""
        folder = self.root / "rollouts" / safe_name(question)
        files = sorted(folder.glob(f"{safe_name(prefix) if prefix else ''}*.parquet"),
                       key=lambda p: (not p.name.startswith("initial"), p.name))  # fmt: skip
        if not files:
            if missing_ok:
                return None
            raise OpdlensError(f"no rollouts stored for question {question!r} in {folder}")
        sets = [self.read_chunk(question, f.stem) for f in files]
        out = sets[0]
        for s in sets[1:]:
            out = out.extend(s)
        return out

    # ---------------------------------------------------------------- tables
    def write_table(self, rel: str, df: pd.DataFrame) -> Path:
        path = self.root / rel
        _write_atomic(pa.Table.from_pandas(df, preserve_index=False), path)
        return path

    def read_table(self, rel: str) -> pd.DataFrame:
        return pq.read_table(self.root / rel).to_pandas()

    def has(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def paths_file(self, question: str) -> str:
        return f"paths/{safe_name(question)}.parquet"

    def nodes_file(self, teacher: str, question: str) -> str:
        return f"nodes/{safe_name(teacher)}/{safe_name(question)}.parquet"

    def priorities_file(self, teacher: str, question: str) -> str:
        return f"priorities/{safe_name(teacher)}/{safe_name(question)}.parquet"

    def question_file(self, folder: str, question: str) -> str:
        return f"{folder}/{safe_name(question)}.parquet"

    def read_all(self, folder: str) -> pd.DataFrame:
        """Concatenate every Parquet file below ``folder`` (empty frame if none)."""
        files = sorted((self.root / folder).rglob("*.parquet"))
        if not files:
            return pd.DataFrame()
        return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
