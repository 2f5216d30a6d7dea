"""The run store: Parquet files under one run directory, written atomically, resumable.

Layout::

    RUN/
      config.yaml                         the run's configuration (rewritten by every run)
      fingerprint.json                    the keys that determine results (a resume must match)
      .lock                               held (flock) while a run writes into the directory
      inputs.parquet                      per question: text and gold answer (for the report)
      rollouts/<question>/<chunk>.parquet one file per sampling chunk (initial, targeted-<i>)
      paths/<question>.parquet            the representative paths of a question
      nodes/<teacher>/<question>.parquet  per-node signals of a (teacher, question)
      phase1/<question>.parquet           marks a question's tree as complete (Ray runs)
      questions.parquet                   per-question summary (rollouts, success rate, answers not found)
      skips.parquet                       recorded skips: (question, teacher, reason)
      corrupt/                            unreadable files set aside (recomputed on the next run)

A chunk file exists only once its rollouts are complete (write to a temporary name, then
rename), so a run interrupted at any moment loses at most the chunk in flight; rerunning skips
every chunk already on disk. Chunk seeds derive from (run seed, question, chunk name) alone, so
a resumed run produces exactly the rollouts an uninterrupted run would; a file that cannot be
read (zero bytes, bad footer) is moved to ``corrupt/`` and counts as missing, so it is recomputed.

Names from the data (question ids, teacher names) become file names only through
:func:`safe_name`, which encodes anything that could leave its folder or hide (``.``, ``..``,
separators, a leading dot, the empty name).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from opdlens.diagnose.tree import RolloutSet
from opdlens.errors import OpdlensError

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A file-name-safe version of an id (stable, collision-resistant): characters other than
    ``[A-Za-z0-9._-]`` become ``_``, a leading dot becomes ``_`` (so ``.``, ``..`` and hidden
    names stay inside their folder), and any name that changed gets a hash of the original."""
    clean = _SAFE.sub("_", name)[:80]
    if clean.startswith("."):
        clean = "_" + clean[1:]
    if clean != name or not clean:
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


def _intact(path: Path) -> bool:
    """A Parquet file whose footer reads (zero-byte and truncated files fail)."""
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return False
    return True


def start_fresh(root: str | Path) -> Path | None:
    """Move an existing, non-empty run directory aside to ``<root>.old-<time>`` (nothing is
    deleted) so a new run starts in an empty one; fails if a run holds the directory."""
    src = Path(root)
    if not src.is_dir() or not any(src.iterdir()):
        return None
    dst = src.with_name(f"{src.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    with RunStore(src).lock():
        try:
            os.replace(src, dst)
        except OSError as exc:
            raise OpdlensError(
                f"cannot move {src} aside to {dst} ({exc.strerror}): move or delete it yourself"
            ) from None
    return dst


class RunStore:
    """Read/write access to one run directory (created if missing)."""

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root)
        if not create:
            if not self.root.is_dir():
                raise OpdlensError(
                    f"run directory {self.root} does not exist: run `opdlens diagnose` (or `opdlens demo`) into it first"
                )
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OpdlensError(
                f"cannot create run directory {self.root}: {exc.strerror}; choose another out_dir"
            ) from None

    # ---------------------------------------------------------------- run-level
    def check_writable(self) -> None:
        """Raise when files cannot be created in the run directory (before any model loads)."""
        probe = self.root / f".write-test-{socket.gethostname()}-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise OpdlensError(
                f"run directory {self.root} is not writable ({exc.strerror}): fix its permissions or choose another out_dir"
            ) from None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the run directory; a second writer fails at once."""
        path = self.root / ".lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OpdlensError(
                f"cannot lock run directory {self.root} ({exc.strerror}): fix its permissions or choose another out_dir"
            ) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise OpdlensError(
                    f"run directory {self.root} is in use by {owner}: wait for it to finish, or use another out_dir"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def has_results(self) -> bool:
        """Whether any rollout or score is stored (a run with nothing stored can change config)."""
        return any(True for d in ("rollouts", "nodes") for _ in (self.root / d).rglob("*.parquet"))

    def set_aside(self, path: Path) -> Path:
        """Move an unreadable file to ``corrupt/`` (same relative path, time-stamped)."""
        rel = path.relative_to(self.root)
        dst = self.root / "corrupt" / rel.parent / f"{rel.name}.{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dst)
        except OSError as exc:
            raise OpdlensError(
                f"{path} is unreadable and cannot be moved aside ({exc.strerror}): delete it and rerun"
            ) from None
        return dst

    def _ok(self, path: Path) -> bool:
        """``path`` exists and is readable; an unreadable file is set aside (so it is recomputed)."""
        if not path.exists():
            return False
        if _intact(path):
            return True
        self.set_aside(path)
        return False

    def _read(self, path: Path) -> pa.Table:
        """A stored table; an unreadable one is set aside and named in a one-line error."""
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            if not path.exists():
                raise OpdlensError(
                    f"{path} is missing: the run is incomplete; rerun `opdlens diagnose` to finish it"
                ) from None
            dst = self.set_aside(path)
            raise OpdlensError(
                f"{path} is unreadable ({type(exc).__name__}); it was moved to {dst}: rerun the same command to recompute it"
            ) from None

    # ---------------------------------------------------------------- rollouts
    def _chunk_path(self, question: str, chunk: str) -> Path:
        return self.root / "rollouts" / safe_name(question) / f"{safe_name(chunk)}.parquet"

    def has_chunk(self, question: str, chunk: str) -> bool:
        return self._ok(self._chunk_path(question, chunk))

    def write_chunk(self, question: str, chunk: str, rollouts: RolloutSet) -> None:
        lengths = np.fromiter((t.size for t in rollouts.tokens), dtype=np.int32, count=len(rollouts.tokens))
        flat = np.concatenate(rollouts.tokens).astype(np.int32) if len(rollouts.tokens) else np.zeros(0, np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        table = pa.table(
            {
                "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
                "success": pa.array(rollouts.success, type=pa.bool_()),
                "forced": pa.array(rollouts.forced, type=pa.int32()),
            }
        )
        _write_atomic(table, self._chunk_path(question, chunk))

    def read_chunk(self, question: str, chunk: str) -> RolloutSet:
        t = self._read(self._chunk_path(question, chunk))
        col = t.column("tokens").combine_chunks()
        offsets = col.offsets.to_numpy().astype(np.int64)
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        tokens = np.split(flat, offsets[1:-1] - offsets[0]) if len(col) else []
        return RolloutSet(
            tokens, t.column("success").to_numpy().astype(bool), t.column("forced").to_numpy().astype(np.int64)
        )

    def _chunk_files(self, question: str, prefix: str = "") -> list[Path]:
        """The question's finished chunk files whose names start with ``prefix``: initial first,
        then in name order."""
        folder = self.root / "rollouts" / safe_name(question)
        return sorted(
            (f for f in folder.glob(f"{safe_name(prefix) if prefix else ''}*.parquet") if self._ok(f)),
            key=lambda p: (not p.name.startswith("initial"), p.name),
        )

    def count_rollouts(self, question: str, prefix: str = "") -> int:
        """How many rollouts :meth:`read_rollouts` would return (0 for none), from the files'
        footers alone."""
        return sum(pq.read_metadata(f).num_rows for f in self._chunk_files(question, prefix))

    @overload
    def read_rollouts(self, question: str, prefix: str = "", *, missing_ok: Literal[False] = False) -> RolloutSet: ...
    @overload
    def read_rollouts(self, question: str, prefix: str = "", *, missing_ok: bool) -> RolloutSet | None: ...
    def read_rollouts(self, question: str, prefix: str = "", *, missing_ok: bool = False) -> RolloutSet | None:
        """The finished chunks of a question whose names start with ``prefix`` (all by default),
        initial first, then targeted in name order. None if there are none and ``missing_ok``."""
        files = self._chunk_files(question, prefix)
        if not files:
            if missing_ok:
                return None
            raise OpdlensError(
                f"no rollouts stored for question {question!r} in {self.root / 'rollouts' / safe_name(question)}"
            )
        return RolloutSet.concat([self.read_chunk(question, f.stem) for f in files])

    # ---------------------------------------------------------------- tables
    def write_text(self, rel: str, text: str) -> Path:
        """Write a small text file atomically (temporary name, then rename)."""
        path = self.root / rel
        tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return path

    def write_table(self, rel: str, df: pd.DataFrame) -> Path:
        path = self.root / rel
        _write_atomic(pa.Table.from_pandas(df, preserve_index=False), path)
        return path

    def read_table(self, rel: str) -> pd.DataFrame:
        return self._read(self.root / rel).to_pandas()

    def has(self, rel: str) -> bool:
        return self._ok(self.root / rel)

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
        files = sorted(f for f in (self.root / folder).rglob("*.parquet") if self._ok(f))
        if not files:
            return pd.DataFrame()
        return pd.concat([self._read(f).to_pandas() for f in files], ignore_index=True)
