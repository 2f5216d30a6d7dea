"""The one way opdlens writes a file: :func:`atomic_write` (and :func:`append_line` for logs).

Every file the package writes (run files, Parquet tables, reports, CSVs, figures, checkpoints,
training logs) goes through these two functions, so that

* a reader never sees a half-written file: the data goes to a temporary file in the same
  directory (same file system), which then replaces the destination with ``os.replace`` (an
  atomic rename); a crash leaves the old file or the new one, never a mix;
* nothing is written *through* a symbolic link: ``os.replace`` replaces the directory entry at
  the destination. A symlink there (say ``report/index.html`` -> ``~/.bashrc`` in a run
  directory received from someone else) is replaced by the new regular file and its target is
  left untouched. The temporary name is unpredictable (random part) and created with
  ``O_EXCL | O_NOFOLLOW`` when opdlens writes the bytes itself.

Appends (``metrics.jsonl``, one row per training step) cannot be atomic renames without
rewriting the whole file every step; :func:`append_line` opens with ``O_NOFOLLOW`` instead and
refuses a symlink, and the readers of such logs skip a torn last line (a crash mid-append).
Symbolic links in *parent* directories are followed, as everywhere: a run directory may itself be
a link (``runs/latest -> /data/run7``).
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opdlens.errors import OpdlensError

__all__ = ["atomic_write", "append_line", "temp_path"]

Writer = Callable[[Path], Any]


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path``: hidden, unique across hosts, processes and calls,
    and with ``path``'s suffix (writers such as matplotlib pick the format from it)."""
    token = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    return path.with_name(f".{path.stem}.tmp-{token}{path.suffix}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path,
    data: bytes | str | Writer,
    *,
    encoding: str = "utf-8",
    fsync: bool = False,
    mkdir: bool = True,
) -> Path:
    """Write ``data`` to ``path`` atomically, never through a symbolic link at ``path``.

    ``data``: the bytes, the text (encoded with ``encoding``), or a writer called with the
    temporary path that writes the whole file there (``lambda p: df.to_csv(p, index=False)``,
    ``lambda p: fig.savefig(p)``, ``lambda p: pq.write_table(t, p)``). The temporary file is
    then renamed over ``path``; a symlink at ``path`` is replaced, its target never written. On
    any error the temporary file is removed and ``path`` is unchanged. ``fsync``: flush the file
    and its directory to disk before returning (durability across power loss; off by default,
    the rename alone already protects against a killed process). ``mkdir``: create missing
    parent directories. Returns ``path``.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        if callable(data):
            data(tmp)
            if not tmp.is_file() or tmp.is_symlink():
                raise OpdlensError(f"writing {path} produced no file")
            if fsync:
                fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        else:
            raw = data.encode(encoding) if isinstance(data, str) else bytes(data)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view) :]
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if fsync:
        _fsync_dir(path.parent)
    return path


def append_line(path: str | Path, line: str, *, encoding: str = "utf-8") -> None:
    """Append ``line`` (a newline is added) to ``path``, created if missing; a symbolic link at
    ``path`` is refused (``O_NOFOLLOW``), so nothing is appended to a file elsewhere."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OpdlensError(
                f"{path} is a symbolic link: opdlens does not append through links; remove it and rerun"
            ) from None
        raise
    try:
        data = (line + "\n").encode(encoding)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
