"""Experiment trackers of a training run (``report_to:`` in a train config).

``metrics.jsonl`` is always written (:class:`opdlens.opd.runlog.RunLogger`); each name in
``report_to`` adds a copy through that tracker's own library, imported only when named:

* ``tensorboard``: ``torch.utils.tensorboard`` events under ``out_dir/tb``;
* ``wandb``: a Weights & Biases run (``WANDB_MODE=offline`` works without a network);
* ``trackio``: a Trackio project (local by default);
* ``swanlab``: a SwanLab experiment under ``out_dir/swanlog`` (``SWANLAB_MODE=offline`` works
  without a network);
* ``mlflow``: an MLflow run (``MLFLOW_TRACKING_URI``, else a file store under ``out_dir/mlruns``,
  which ``mlflow-skinny`` can write).

Every tracker but TensorBoard gets the run's configuration once; every tracker gets, per step,
the finite scalars of the step's row under ``train/<name>`` and ``eval/<name>`` (the names of
``metrics.jsonl``). The per-position curves (``<metric>_chunk_<start>_<end>``) are scalars among
them; wandb also draws each as a native line plot (``curves/<group>/<metric>``, one
``wandb.plot.line`` per metric and step). A tracker that is named but not installed is an error
naming the pip extra, raised before training starts.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from opdlens.errors import OpdlensError

#: The trackers ``report_to`` may name, with the module each one imports and the pip extra that
#: installs it (``pip install 'opdlens[<extra>]'``).
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "swanlab": ("swanlab", "swanlab"),
    "mlflow": ("mlflow", "mlflow"),
}

_CHUNK = re.compile(r"^(?P<name>.+)_chunk_(?P<start>\d+)_(?P<end>\d+)$")


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], curves: dict[str, list[tuple[int, float]]], step: int) -> None: ...

    def close(self) -> None: ...


def check_trackers(names: list[str]) -> None:
    """Every tracker in ``names`` is known and importable; else one error naming what to install."""
    for name in names:
        if name not in TRACKERS:
            raise OpdlensError(f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        module, extra = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise OpdlensError(
                f"report_to: {name} needs the {module.split('.')[0]} package, which is not installed "
                f"({e}); install it with pip install 'opdlens[{extra}]', or remove {name} from report_to"
            ) from e


def split_row(row: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """A step's row as tracker names: ``({"train/<k>" or "eval/<k>": value}, {curve: [(start, value)]})``;
    non-finite and non-numeric values are left out (they stay in metrics.jsonl as null)."""
    scalars: dict[str, float] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            continue
        group = "eval" if k.startswith("eval_") else "train"
        scalars[f"{group}/{k}"] = float(v)
        m = _CHUNK.match(k)
        if m:
            curves.setdefault(f"{group}/{m['name']}", []).append((int(m["start"]), float(v)))
    for points in curves.values():
        points.sort()
    return scalars, curves


def run_id(out_dir: Path, fingerprint: str) -> str:
    """A stable id of the run (its directory and result keys): a resumed run continues the same
    tracker run where the tracker can (wandb ``resume="allow"``)."""
    return hashlib.sha256(f"{out_dir.resolve()}\n{fingerprint}".encode()).hexdigest()[:16]


class _TensorBoard:
    def __init__(self, out_dir: Path, start_step: int, **_: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, scalars: dict[str, float], curves: dict[str, list[tuple[int, float]]], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out_dir: Path, config: dict[str, Any], project: str, name: str, ident: str, **_: Any) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project, name=name, id=ident, resume="allow", dir=str(out_dir), config=config, reinit=True
        )

    def log(self, scalars: dict[str, float], curves: dict[str, list[tuple[int, float]]], step: int) -> None:
        row: dict[str, Any] = dict(scalars)
        for name, points in curves.items():
            table = self.wandb.Table(columns=["position", "value"], data=[list(p) for p in points])
            row[f"curves/{name}"] = self.wandb.plot.line(table, "position", "value", title=f"{name} by position")
        self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, config: dict[str, Any], project: str, name: str, **_: Any) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=project, name=name, config=config, resume="allow")

    def log(self, scalars: dict[str, float], curves: dict[str, list[tuple[int, float]]], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _Swanlab:
    def __init__(self, out_dir: Path, config: dict[str, Any], project: str, name: str, **_: Any) -> None:
        import swanlab

        self.swanlab = swanlab
        swanlab.init(project=project, experiment_name=name, config=config, logdir=str(out_dir / "swanlog"))

    def log(self, scalars: dict[str, float], curves: dict[str, list[tuple[int, float]]], step: int) -> None:
        self.swanlab.log(scalars, step=step)

    def close(self) -> None:
        self.swanlab.finish()


#: MLflow metric names allow letters, digits, ``_ - . /`` and spaces: ``[`` ``]`` ``,`` ``=`` become ``_``.
_MLFLOW_BAD = re.compile(r"[^\w\-./ ]")


class _Mlflow:
    def __init__(self, out_dir: Path, config: dict[str, Any], project: str, name: str, **_: Any) -> None:
        import os

        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # a local file store beside the run (works with mlflow-skinny, which has no database
            # backend); MLflow >= 3.7 asks for this opt-in before writing one
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(project)
        mlflow.start_run(run_name=name)
        flat = _flatten(config)
        mlflow.log_params({k[:250]: str(v)[:500] for k, v in flat.items()})

    def log(self, scalars: dict[str, float], curves: dict[str, list[tuple[int, float]]], step: int) -> None:
        self.mlflow.log_metrics({_MLFLOW_BAD.sub("_", k): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_BUILDERS: dict[str, Callable[..., Tracker]] = {
    "tensorboard": _TensorBoard,
    "wandb": _Wandb,
    "trackio": _Trackio,
    "swanlab": _Swanlab,
    "mlflow": _Mlflow,
}


def open_trackers(
    names: list[str], out_dir: Path, start_step: int, config: dict[str, Any], project: str, name: str, ident: str
) -> list[Tracker]:
    """The trackers of ``names`` (checked with :func:`check_trackers`), each started once."""
    check_trackers(names)
    kw = {"out_dir": out_dir, "start_step": start_step, "config": config, "project": project, "name": name}
    return [_BUILDERS[n](ident=ident, **kw) for n in names]
