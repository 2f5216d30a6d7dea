"""Logging of an OPD run: metric sums across micro-batches/processes, metrics.jsonl, TensorBoard.

``metrics.jsonl`` grows by one appended line per step (:func:`opdlens.io.append_line`: opened
with ``O_NOFOLLOW``, so a symlink planted there is refused, never written through); rewriting the
whole file atomically every step would cost O(steps²). A crash mid-append can leave a torn last
line: the readers skip a last line that is not JSON, and a resume rewrites the file atomically
(:func:`opdlens.io.atomic_write`) with the rows up to its checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from opdlens.errors import OpdlensError
from opdlens.io import append_line, atomic_write
from opdlens.opd.metrics import RatioMetrics, TokenMetrics, chunk_sums
from opdlens.opd.trackers import Tracker, split_row

METRICS_FILE = "metrics.jsonl"


class MetricSums:
    """``name -> [Σ num, Σ den]`` (plus the names reported as ``sqrt(Σ num) / Σ den``), and maxima.

    Everything a step logs is a ratio of sums or a maximum, so micro-batches and processes combine
    by adding or taking the max (:meth:`merge`) and the result equals the full-batch value.
    """

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self.root: set[str] = set()
        self.maxes: dict[str, float] = {}

    def add_max(self, name: str, value: float) -> None:
        self.maxes[name] = max(self.maxes.get(name, value), value)

    def add(self, name: str, num: float, den: float) -> None:
        s = self.sums.setdefault(name, [0.0, 0.0])
        s[0] += num
        s[1] += den

    def add_tokens(self, metrics: TokenMetrics, mask: torch.Tensor, skip: tuple[str, ...] = ()) -> None:
        """Token means of :class:`TokenMetrics` (NaN positions are not counted)."""
        m = mask.bool()
        for name, x in vars(metrics).items():
            if x is None or name in skip:
                continue
            sel = m & ~torch.isnan(x)
            self.add(name, float(x[sel].double().sum()), float(sel.sum()))

    def add_ratios(self, metrics: RatioMetrics, mask: torch.Tensor, chunk: int = 0) -> None:
        m = mask.to(torch.float64)
        for name, num in metrics.num.items():
            self.add(name, float((num.double() * m).sum()), float((metrics.den[name].double() * m).sum()))
        self.root |= set(metrics.root)
        if chunk > 0:
            for name, (a, b) in chunk_sums(metrics, mask, chunk).items():
                self.add(name, a, b)

    def merge(self, other: MetricSums) -> None:
        for name, (a, b) in other.sums.items():
            self.add(name, a, b)
        self.root |= other.root
        for name, v in other.maxes.items():
            self.add_max(name, v)

    def means(self, prefix: str = "") -> dict[str, float]:
        out = {}
        for name, (a, b) in self.sums.items():
            val = (math.sqrt(max(a, 0.0)) if name in self.root else a) / b if b > 0 else float("nan")
            out[prefix + name] = val
        out.update({prefix + name: v for name, v in self.maxes.items()})
        return out


class RunLogger:
    """Appends one JSON row per step to ``metrics.jsonl`` and hands it to the run's experiment
    trackers (:mod:`opdlens.opd.trackers`)."""

    def __init__(self, out_dir: Path, start_step: int, trackers: Sequence[Tracker] = ()) -> None:
        self.path = out_dir / METRICS_FILE
        if self.path.exists() or self.path.is_symlink():  # resume: drop rows written after the checkpoint
            keep = [json.dumps(r) for r in _rows(self.path) if r.get("step", 0) <= start_step]
            atomic_write(self.path, "".join(ln + "\n" for ln in keep))  # replaces a symlink, never follows it
        self.trackers = list(trackers)

    def log(self, row: dict[str, Any]) -> None:
        append_line(self.path, json.dumps(jsonable(row)))
        if self.trackers:
            scalars, curves = split_row(row)
            for t in self.trackers:
                t.log(scalars, curves, int(row["step"]))

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats become null (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``out_dir/metrics.jsonl``."""
    p = Path(out_dir) / METRICS_FILE
    if not p.is_file():
        raise OpdlensError(f"no {METRICS_FILE} in {out_dir}")
    return _rows(p)


def _rows(path: Path) -> list[dict[str, Any]]:
    """The JSON rows of a log; a torn last line (a crash mid-append) is skipped, any other
    unreadable line is an error naming it."""
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise OpdlensError(f"cannot read {path} ({exc}): move it aside and rerun") from None
    rows = []
    for i, ln in enumerate(lines):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == len(lines) - 1:
                break  # torn by a crash while appending
            raise OpdlensError(f"{path} line {i + 1} is not a JSON row: move the file aside and rerun") from None
        rows.append(row)
    return rows
