"""``bench/paper_question.py``: the time split, the suite projection's arithmetic, and its CPU smoke
run end to end (tiny random models, coin grades) checked against the run directory it keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pq():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT))
    try:
        from bench import paper_question

        yield paper_question
    finally:
        sys.path.remove(str(ROOT))


def test_split_counts_every_instant_once(pq) -> None:  # type: ignore[no-untyped-def]
    """Overlapping spans go to the label listed first in SPLIT; uncovered time is 'other'."""
    spans = {
        "targeted rollouts": [(10.0, 30.0)],
        "teacher scoring": [(25.0, 35.0), (50.0, 55.0)],  # 25-30 overlaps the targeted span: scoring wins
        "model loading": [(0.0, 5.0), (52.0, 53.0)],  # inside a scoring span: loading wins
        "initial rollouts": [(5.0, 8.0)],
    }
    got = pq.split_time(spans, 0.0, 60.0)
    assert got["model loading"] == pytest.approx(5 + 1)
    assert got["teacher scoring"] == pytest.approx(10 + 4)
    assert got["targeted rollouts"] == pytest.approx(15)
    assert got["initial rollouts"] == pytest.approx(3)
    assert got["solutions + summaries"] == 0
    assert got["other"] == pytest.approx(60 - 6 - 14 - 15 - 3)  # 8-10, 35-50, 55-60
    # a window that cuts spans counts only their parts inside it
    assert pq.split_time(spans, 20.0, 40.0) == pytest.approx(
        {**dict.fromkeys(got, 0.0), "targeted rollouts": 5.0, "teacher scoring": 10.0, "other": 5.0}
    )


def _result(shape: str, task: str, tokens: int, wall: float, load: float, targeted_s: float, n: int) -> dict:
    split = {"model loading": load, "targeted rollouts": targeted_s, "teacher scoring": 1.0, "other": 0.5}
    return dict(
        shape=shape,
        task_like=task,
        max_new_tokens=tokens,
        wall_s=wall,
        time_split_s=split,
        targeted_rollouts=n,
        device="cpu",
    )


def test_projection_by_hand(pq) -> None:  # type: ignore[no-untyped-def]
    results = [
        _result("qwen3-0.6b", "boolq", 200, wall=100.0, load=20.0, targeted_s=50.0, n=10_000),
        _result("qwen3-0.6b", "mmlu", 2048, wall=400.0, load=20.0, targeted_s=300.0, n=20_000),
    ]
    args = Namespace(suite_students=["qwen3-0.6b", "qwen3-1.7b"], trace_tokens={"boolq": 200, "mmlu": 2048})
    p = pq.projection(results, args)
    # BoolQ, 100 questions: load 20 s once per setting, the rest 30 s, 5 ms per targeted rollout
    boolq = {n: 20 / 100 + 30 + 0.005 * n for n in (10_000, 45_000, 200_000)}
    # MMLU, 100 questions: 80 s besides loading and targeting, 15 ms per targeted rollout
    mmlu = {n: 20 / 100 + 80 + 0.015 * n for n in (20_000, 45_000, 200_000)}
    # AIME, 30 questions: the MMLU-like question scaled by 28672 / 2048 = 14 (loading shared by 30 questions)
    aime = {n: 14 * (20 / 30 + 80 + 0.015 * n) for n in (20_000, 45_000, 200_000)}
    day = 86400
    exp = {
        "as run": (100 * boolq[10_000] + 100 * mmlu[20_000]) / day,
        "45K targeted": (100 * boolq[45_000] + 100 * mmlu[45_000]) / day,
        "200K targeted": (100 * boolq[200_000] + 100 * mmlu[200_000]) / day,
    }
    assert p["suite_gpu_days_boolq_mmlu"] == pytest.approx(exp)
    with_aime = {
        "as run": exp["as run"] + 30 * aime[20_000] / day,
        "45K targeted": exp["45K targeted"] + 30 * aime[45_000] / day,
        "200K targeted": exp["200K targeted"] + 30 * aime[200_000] / day,
    }
    assert p["suite_gpu_days_with_aime"] == pytest.approx(with_aime)
    assert p["ratio_to_paper"] == pytest.approx({k: v / 72 for k, v in with_aime.items()})
    assert p["not_measured"] == ["qwen3-1.7b boolq", "qwen3-1.7b mmlu", "qwen3-1.7b aime"]
    assert any("paper silent" in a for a in p["assumptions"])


@pytest.mark.slow  # ~30 s of CPU time (1.5 min on the shared 2-core machine)
def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    """``--smoke`` on the CPU: both trace lengths run the paper protocol with 8 teachers; the
    reported counts are those of the kept run directories, the split adds up to the wall time."""
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "paper_question.py"), "--smoke", "--json", str(out)]
    proc = subprocess.run([*cmd, "--keep", str(tmp_path / "runs")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "projection of the paper's suite" in proc.stdout
    data = json.loads(out.read_text())
    results = data["results"]
    assert [(r["task_like"], r["max_new_tokens"]) for r in results] == [("boolq", 12), ("mmlu", 24)]
    for r in results:
        run = tmp_path / "runs" / f"tiny-{r['task_like']}"
        cfg = (run / "config.yaml").read_text()
        assert "protocol: paper" in cfg
        chunks = list((run / "rollouts").rglob("*.parquet"))
        forced = pd.concat([pd.read_parquet(f, columns=["forced"]) for f in chunks])["forced"]
        assert r["initial_rollouts"] == 16 == int((forced == 0).sum())
        assert r["targeted_rollouts"] == int((forced > 0).sum()) > 0
        assert sum(r["time_split_s"].values()) == pytest.approx(r["wall_s"], rel=1e-6)
        assert all(v >= 0 for v in r["time_split_s"].values())
        assert len(r["teachers"]) == 8 and r["gpu_minutes"] is None
        nodes = pd.concat([pd.read_parquet(f) for f in (run / "nodes").rglob("*.parquet")])
        assert len(nodes) == r["node_rows"] > 0
        assert set(nodes["teacher"]) <= set(r["teachers"])
    assert set(data["projection"]["suite_gpu_days_with_aime"]) == {"as run", "45K targeted", "200K targeted"}


def test_projection_from_json_files(pq, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``--from-json``: the results of several calls (one setting each) projected together, as one
    call over all of them would."""
    rs = [
        _result("qwen3-0.6b", "boolq", 200, wall=100.0, load=20.0, targeted_s=50.0, n=10_000),
        _result("qwen3-1.7b", "mmlu", 2048, wall=400.0, load=20.0, targeted_s=300.0, n=20_000),
    ]
    files = []
    for i, r in enumerate(rs):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps({"results": [r]}))
    out = pq.main(["--from-json", *map(str, files), "--json", str(tmp_path / "all.json")])
    args = Namespace(suite_students=["qwen3-0.6b", "qwen3-1.7b"], trace_tokens={"boolq": 200, "mmlu": 2048})
    assert out["projection"]["suite_gpu_days_with_aime"] == pytest.approx(
        pq.projection(rs, args)["suite_gpu_days_with_aime"]
    )
    assert out["projection"]["not_measured"] == ["qwen3-0.6b mmlu", "qwen3-0.6b aime", "qwen3-1.7b boolq"]
    assert json.loads((tmp_path / "all.json").read_text())["results"] == rs
