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
      corrupt/                            unreadable files set aside by `diagnose` (recomputed on the next run)
      store.json                          the store's version (how names become file names)

A chunk file exists only once its rollouts are complete (write to a temporary name, then
rename), so a run interrupted at any moment loses at most the chunk in flight; rerunning skips
every chunk already on disk. Chunk seeds derive from (run seed, question, chunk name) alone, so
a resumed run produces exactly the rollouts an uninterrupted run would; a file that cannot be
read (zero bytes, bad footer) is moved to ``corrupt/`` and counts as missing, so it is recomputed.

Names from the data (question ids, teacher names, context names) become file names only through
:meth:`RunStore.name`, which encodes them injectively and case-safely (:func:`safe_name`):
nothing can leave its folder or hide (``.``, ``..``, separators, a leading dot, the empty name),
two ids never share a file, also on a case-insensitive file system (macOS), and
:meth:`RunStore.check_names` refuses a question set whose names collide anyway. ``store.json``
records the encoding; a run written before it existed (:data:`STORE_VERSION` 1) keeps the old
encoding (:func:`legacy_safe_name`), so it resumes and reports as before.

Every file is written by :func:`opdlens.io.atomic_write` (temporary file, then ``os.replace``;
a symbolic link at the destination is replaced, never written through).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
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
from opdlens.io import atomic_write

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PLAIN = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")

#: Version of the store layout this opdlens writes (``store.json``): 2 = :func:`safe_name`.
#: Version 1 (no ``store.json``; runs written before it) named files by :func:`legacy_safe_name`.
STORE_VERSION = 2
STORE_FILE = "store.json"
#: Folders whose presence (without ``store.json``) marks a run written by store version 1.
_RESULT_DIRS = ("rollouts", "nodes", "paths", "priorities", "phase1", "external", "solutions", "incontext")
#: What makes a directory a run directory (diagnose or train) that ``--fresh`` may move aside.
RUN_MARKERS = (
    "config.yaml",
    "fingerprint.json",
    STORE_FILE,
    ".lock",
    "rollouts",
    "nodes",
    "checkpoints",
    "metrics.jsonl",
)


def _hash(name: str, n: int) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def safe_name(name: str) -> str:
    """The file name of an id: injective and case-safe.

    An id made only of ``[a-z0-9._-]``, starting with a letter or digit and at most 80 long is
    its own file name. Any other id becomes its safe characters (others replaced by ``_``, a
    leading dot by ``_``, cut at 72) plus ``+`` and 16 hex digits of the SHA-256 of the exact id.
    The two kinds never meet (only the second holds ``+``), the first is lowercase, so two ids
    share a name, also ignoring case, only if their hashes agree; :meth:`RunStore.check_names`
    turns that (astronomically unlikely) case into an error naming both ids."""
    if _PLAIN.fullmatch(name):
        return name
    clean = _SAFE.sub("_", name)[:72]
    if clean.startswith("."):
        clean = "_" + clean[1:]
    return f"{clean}+{_hash(name, 16)}"


def legacy_safe_name(name: str) -> str:
    """The file name of an id in store version 1 (runs written before ``store.json``): safe
    characters kept, a name that changed suffixed ``-`` + 8 hex digits of its SHA-1. Not
    injective (``"a b"`` and ``"a_b-7dbde935"`` share ``a_b-7dbde935``) nor case-safe; kept to
    read and resume such runs, whose ids :meth:`RunStore.check_names` checks for collisions."""
    clean = _SAFE.sub("_", name)[:80]
    if clean.startswith("."):
        clean = "_" + clean[1:]
    if clean != name or not clean:
        clean += "-" + hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return clean


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed determined by the run seed and the names of what is being sampled."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _write_atomic(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _intact(path: Path) -> bool:
    """A Parquet file whose footer reads (zero-byte and truncated files fail)."""
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return False
    return True


def is_run_dir(root: str | Path) -> bool:
    """Whether ``root`` holds a run of ``opdlens diagnose`` or ``opdlens train`` (one of
    :data:`RUN_MARKERS`)."""
    return any((Path(root) / m).exists() for m in RUN_MARKERS)


def check_fresh(root: str | Path) -> Path | None:
    """The directory :func:`start_fresh` would move aside (None: nothing to move), or the
    :class:`OpdlensError` saying why it will not (checked before any model loads)."""
    src = Path(os.path.abspath(root))  # "runs/x/.." names runs, whose name is not ".."
    if not src.is_dir() or not any(src.iterdir()):
        return None
    here = Path.cwd().resolve()
    if src.resolve() == here or src.resolve() in here.parents:
        raise OpdlensError(
            f"--fresh cannot move {str(root)!r} aside: it is the current directory or one above it; "
            "set out_dir to the run's own folder (e.g. runs/<name>) and run from outside it"
        )
    if not is_run_dir(src):
        raise OpdlensError(
            f"--fresh refuses to move {src} aside: it is not a run directory (it has none of "
            f"{', '.join(RUN_MARKERS)}); choose another out_dir, or move or delete it yourself"
        )
    return src


def start_fresh(root: str | Path) -> Path | None:
    """Move an existing, non-empty run directory aside to ``<root>.old-<time>`` (nothing is
    deleted) so a new run starts in an empty one; fails if a run holds the directory. Returns
    where it went (None: nothing to move).

    Refused (:class:`OpdlensError`, nothing moved): a directory that holds no run (none of
    :data:`RUN_MARKERS`: ``--fresh`` never moves a folder of other files), and the current
    directory or one above it (``out_dir: .``: the new run would go on in the moved folder)."""
    src = check_fresh(root)
    if src is None:
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
    """Read/write access to one run directory (created if missing).

    ``set_aside``: move an unreadable file to ``corrupt/`` so that the next run recomputes it
    (what ``diagnose`` does). With ``set_aside=False`` (the report's reader) nothing is moved:
    unreadable files are skipped and listed in :attr:`unreadable` (so the reader can say that
    its result is incomplete), and :meth:`read_table` of one raises an error naming it."""

    def __init__(self, root: str | Path, *, create: bool = True, set_aside: bool = True) -> None:
        self.root = Path(root)
        self.set_aside_unreadable = set_aside
        self.unreadable: list[Path] = []
        if not create:
            if not self.root.is_dir():
                raise OpdlensError(
                    f"run directory {self.root} does not exist: run `opdlens diagnose` (or `opdlens demo`) into it first"
                )
        else:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OpdlensError(
                    f"cannot create run directory {self.root}: {exc.strerror}; choose another out_dir"
                ) from None
        self._version: int | None = None

    @property
    def version(self) -> int:
        """The store version (read once, on first use: see :meth:`_read_version`)."""
        if self._version is None:
            self._version = self._read_version()
        return self._version

    def _read_version(self) -> int:
        """The store version of the directory: ``store.json``'s, else 1 for a run written before
        it (result folders present), else :data:`STORE_VERSION` (a new run)."""
        f = self.root / STORE_FILE
        if f.is_file():
            try:
                version = json.loads(f.read_text(encoding="utf-8"))["version"]
                if not isinstance(version, int):
                    raise TypeError("not an integer")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise OpdlensError(
                    f"{f} is unreadable ({type(exc).__name__}: {exc}): it names the run's file layout; "
                    "restore it, or pass --fresh to move the run aside and start afresh"
                ) from None
            if version > STORE_VERSION:
                raise OpdlensError(
                    f"run directory {self.root} was written by a newer opdlens (store version {version}, "
                    f"this one reads up to {STORE_VERSION}): upgrade opdlens"
                )
            return version
        if any((self.root / d).is_dir() for d in _RESULT_DIRS) or (self.root / "questions.parquet").exists():
            return 1
        return STORE_VERSION

    def _mark_version(self) -> None:
        """Write ``store.json`` before the first file of a new run (a version-1 run stays 1)."""
        if self.version >= 2 and not (self.root / STORE_FILE).is_file():
            atomic_write(self.root / STORE_FILE, json.dumps({"version": self.version}) + "\n")

    def name(self, name: str) -> str:
        """The file name of an id in this run (:func:`safe_name`; :func:`legacy_safe_name` in a
        version-1 run)."""
        return safe_name(name) if self.version >= 2 else legacy_safe_name(name)

    def check_names(self, what: str, names: list[str]) -> None:
        """Refuse ids whose file names would coincide, also ignoring case (a case-insensitive
        file system): one error naming both ids."""
        seen: dict[str, str] = {}
        for n in names:
            key = self.name(n).casefold()
            other = seen.setdefault(key, n)
            if other != n:
                raise OpdlensError(
                    f"{what} ids {other!r} and {n!r} would share the file name {self.name(n)!r} in {self.root}"
                    + (
                        " (this run was written by an older opdlens whose file names can collide); rename one "
                        "of them, or pass --fresh to start a new run, which names files without collisions"
                        if self.version < 2
                        else "; rename one of them"
                    )
                )

    # ---------------------------------------------------------------- run-level
    def check_writable(self) -> None:
        """Raise when files cannot be created in the run directory (before any model loads)."""
        probe = self.root / f".write-test-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
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
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never truncate a link's target
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
        """``path`` exists and is readable; an unreadable file is set aside (so it is recomputed),
        or, with ``set_aside=False``, listed in :attr:`unreadable`."""
        if not path.exists():
            return False
        if _intact(path):
            return True
        if self.set_aside_unreadable:
            self.set_aside(path)
        elif path not in self.unreadable:
            self.unreadable.append(path)
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
            if not self.set_aside_unreadable:
                raise OpdlensError(
                    f"{path} is unreadable ({type(exc).__name__}): rerun `opdlens diagnose` with the run's "
                    "config to recompute it"
                ) from None
            dst = self.set_aside(path)
            raise OpdlensError(
                f"{path} is unreadable ({type(exc).__name__}); it was moved to {dst}: rerun the same command to recompute it"
            ) from None

    # ---------------------------------------------------------------- rollouts
    def _chunk_path(self, question: str, chunk: str) -> Path:
        return self.root / "rollouts" / self.name(question) / f"{self.name(chunk)}.parquet"

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
        self._mark_version()
        _write_atomic(table, self._chunk_path(question, chunk))

    def read_chunk(self, question: str, chunk: str) -> RolloutSet:
        return self._read_chunk_file(self._chunk_path(question, chunk))

    def _read_chunk_file(self, path: Path) -> RolloutSet:
        t = self._read(path)
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
        folder = self.root / "rollouts" / self.name(question)
        return sorted(
            (f for f in folder.glob(f"{glob.escape(self.name(prefix)) if prefix else ''}*.parquet") if self._ok(f)),
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
                f"no rollouts stored for question {question!r} in {self.root / 'rollouts' / self.name(question)}"
            )
        return RolloutSet.concat([self._read_chunk_file(f) for f in files])

    # ---------------------------------------------------------------- tables
    def write_text(self, rel: str, text: str) -> Path:
        """Write a small text file atomically (:func:`opdlens.io.atomic_write`)."""
        self._mark_version()
        return atomic_write(self.root / rel, text)

    def write_table(self, rel: str, df: pd.DataFrame) -> Path:
        self._mark_version()
        path = self.root / rel
        _write_atomic(pa.Table.from_pandas(df, preserve_index=False), path)
        return path

    def read_table(self, rel: str) -> pd.DataFrame:
        return self._read(self.root / rel).to_pandas()

    def has(self, rel: str) -> bool:
        return self._ok(self.root / rel)

    def paths_file(self, question: str) -> str:
        return f"paths/{self.name(question)}.parquet"

    def nodes_file(self, teacher: str, question: str) -> str:
        return f"nodes/{self.name(teacher)}/{self.name(question)}.parquet"

    def priorities_file(self, teacher: str, question: str) -> str:
        return f"priorities/{self.name(teacher)}/{self.name(question)}.parquet"

    def question_file(self, folder: str, question: str) -> str:
        return f"{folder}/{self.name(question)}.parquet"

    def read_all(self, folder: str) -> pd.DataFrame:
        """Concatenate every Parquet file below ``folder`` (empty frame if none)."""
        files = sorted(f for f in (self.root / folder).rglob("*.parquet") if self._ok(f))
        if not files:
            return pd.DataFrame()
        return pd.concat([self._read(f).to_pandas() for f in files], ignore_index=True)
