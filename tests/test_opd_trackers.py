"""Experiment trackers (``report_to``): wandb, mlflow and swanlab for real in their offline modes
(what they wrote read back), trackio through a stand-in module that records the calls,
TensorBoard, and the error for a tracker that is not installed (issue 25)."""

from __future__ import annotations

import glob
import json
import struct
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from opdlens.errors import OpdlensError
from opdlens.opd.config import TrainConfig
from opdlens.opd.run import train
from opdlens.opd.runlog import read_metrics
from opdlens.opd.trackers import split_row
from tests.helpers import arith_questions, one_thread, tiny, tiny_train_config

TASK, QS = arith_questions(8)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _cfg(tmp_path: Path, **kw: Any) -> TrainConfig:
    return tiny_train_config(tmp_path, **{"lr": 0.003, "metrics_chunk": 2, **kw})


def _train(cfg: TrainConfig) -> list[dict[str, Any]]:
    train(cfg, student=tiny(0), teacher=tiny(1), task=TASK, train_questions=QS, eval_questions=[])
    return read_metrics(cfg.out_dir)


def test_rows_become_tracker_names_and_position_curves() -> None:
    scalars, curves = split_row(
        {
            "step": 3,
            "loss": 0.5,
            "eval_rkl": 0.1,
            "x_chunk_2_4": 0.7,
            "x_chunk_0_2": 0.9,
            "nan": float("nan"),
            "ok": True,
        }
    )
    assert scalars == {"train/loss": 0.5, "eval/eval_rkl": 0.1, "train/x_chunk_2_4": 0.7, "train/x_chunk_0_2": 0.9}
    assert curves == {"train/x": [(0, 0.9), (2, 0.7)]}


def test_trackers_key_and_the_older_tensorboard_spelling(tmp_path: Path) -> None:
    assert TrainConfig(out_dir=str(tmp_path)).trackers == ["tensorboard"]
    assert TrainConfig(out_dir=str(tmp_path), tensorboard=False).trackers == []
    assert TrainConfig(out_dir=str(tmp_path), report_to=["wandb"], tensorboard=True).trackers == [
        "wandb",
        "tensorboard",
    ]
    with pytest.raises(Exception, match="report_to"):
        TrainConfig(out_dir=str(tmp_path), report_to=["neptune"])


def test_a_tracker_that_is_not_installed_is_one_error_before_any_model_loads(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "swanlab", None)  # import fails as for a missing package
    cfg = _cfg(tmp_path, report_to=["swanlab"], student="/nonexistent/model", teacher="/nonexistent/model")
    with pytest.raises(OpdlensError, match=r"swanlab.*pip install 'opdlens\[swanlab\]'"):
        train(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()


def _wandb_records(run_file: str) -> list[Any]:
    """The protobuf records of a wandb run file (a LevelDB-style log of 32 KiB blocks, each record
    with a 7-byte header: CRC, length, type full/first/middle/last), read without wandb's service."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    pos, block, out, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
    return out


def test_wandb_offline_run_holds_the_metrics_the_config_and_the_curves(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, report_to=["wandb"], project="opd-test", run_name="tiny")
    rows = {r["step"]: r for r in _train(cfg)}
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    recs = _wandb_records(run_file)
    history = {}
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            history[int(items["_step"])] = items
    assert set(history) >= {1, 2}
    for step in (1, 2):
        assert json.loads(history[step]["train/loss"]) == pytest.approx(rows[step]["loss"], rel=1e-9)
        assert any(k.startswith("curves/train/") for k in history[step])  # the per-position plots
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert run.project == "opd-test" and run.display_name == "tiny"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["loss"] == cfg.loss and config["lr"] == cfg.lr


class _Recorder(types.ModuleType):
    """A stand-in tracker module: every call recorded as (function, args, kwargs)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, fn: str) -> Any:
        if fn.startswith("__"):
            raise AttributeError(fn)
        return lambda *a, **k: self.calls.append((fn, a, k))


def test_trackio_gets_the_config_and_every_step(tmp_path: Path, monkeypatch) -> None:
    """trackio through a recording stand-in (installing it pulls in gradio, too heavy for CI)."""
    mod = _Recorder("trackio")
    monkeypatch.setitem(sys.modules, "trackio", mod)
    cfg = _cfg(tmp_path, report_to=["trackio"], project="p", run_name="r")
    rows = {r["step"]: r for r in _train(cfg)}
    logs = [c for c in mod.calls if c[0] == "log"]
    assert [c[2]["step"] for c in logs] == [1, 2]
    for c in logs:
        assert c[1][0]["train/overlap_ratio"] == pytest.approx(rows[c[2]["step"]]["overlap_ratio"])
    ((_, _, init),) = [c for c in mod.calls if c[0] == "init"]
    assert init["project"] == "p" and init["name"] == "r" and init["config"]["loss"] == cfg.loss
    assert mod.calls[-1][0] == "finish"


def test_mlflow_file_store_holds_the_params_and_every_step(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = _cfg(tmp_path, report_to=["mlflow"], project="opd-test", run_name="tiny")
    rows = {r["step"]: r for r in _train(cfg)}
    client = MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("opd-test").experiment_id])
    assert run.info.run_name == "tiny" and run.data.params["loss"] == cfg.loss
    assert run.data.params["lr"] == str(cfg.lr)
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history == [(s, pytest.approx(rows[s]["loss"])) for s in (1, 2)]


def test_swanlab_offline_run_holds_the_config_and_every_step(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    cfg = _cfg(tmp_path, report_to=["swanlab"], project="opd-test", run_name="tiny")
    rows = {r["step"]: r for r in _train(cfg)}
    (run,) = (tmp_path / "swanlog").glob("run-*")
    assert "value: " + cfg.loss in (run / "files" / "config.yaml").read_text()
    # the offline run file, read with swanlab's own reader and record type (what `swanlab sync` uploads)
    from swanlab.proto.swanlab.record.v1 import record_pb2
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    reader = DataStoreReader()
    (run_file,) = run.glob("*.swanlab")
    reader.open(run_file)
    logged: dict[tuple[str, int], float] = {}
    for data in reader:
        rec = record_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "scalar":
            logged[(rec.scalar.key, rec.scalar.step)] = rec.scalar.value.number
    reader.close()
    assert {step for _, step in logged} == {1, 2}
    for step in (1, 2):  # swanlab stores float32
        assert logged[("train/loss", step)] == pytest.approx(rows[step]["loss"], rel=1e-6)
        assert logged[("train/overlap_ratio", step)] == pytest.approx(rows[step]["overlap_ratio"], rel=1e-6)


def test_mlflow_metric_names_lose_the_characters_it_refuses() -> None:
    from opdlens.opd.trackers import _MLFLOW_BAD

    assert _MLFLOW_BAD.sub("_", "train/audit/align[opd[k=16,set=student]][Self-1C]") == (
        "train/audit/align_opd_k_16_set_student___Self-1C_"
    )


def test_tensorboard_events_under_tb(tmp_path: Path) -> None:
    _train(_cfg(tmp_path, report_to=["tensorboard"]))
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())
