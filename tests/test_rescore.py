"""``opdlens rescore``: a finished run's tree scored again under other scoring choices, nothing sampled."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
from typer.testing import CliRunner

from opdlens.cli import app
from opdlens.diagnose import run as drun
from opdlens.diagnose.rescore import RESCORED_FILE, rescore
from opdlens.diagnose.store import RunStore
from opdlens.errors import OpdlensError
from opdlens.report.run import load_run
from tests.test_fuzz import _synthetic_builder
from tests.test_run_identity import ROWS, _dcfg, _diagnose, _jsonl

NO_SAMPLING = 0  # the synthetic student raises KeyboardInterrupt on its first sampling call


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A finished run (protocol: paper: all-ancestors accounting, literal S_u, plug-in cosine)."""
    tmp = tmp_path_factory.mktemp("src")
    data = _jsonl(tmp / "data.jsonl", ROWS)
    _diagnose(_dcfg(tmp, data, protocol="paper", targeting={"first_window": 2, "visit_target": 4}))
    return tmp / "run"


def _rescore(src: Path, out: Path, overrides=(), **kw) -> RunStore:
    with mock.patch.object(drun, "build_diagnosis", _synthetic_builder(NO_SAMPLING)):
        return rescore(src, out, overrides, progress=False, **kw)


def _nodes(root: Path) -> pd.DataFrame:
    res = load_run(root)
    assert not res.partial
    return res.nodes.sort_values(["teacher", "question_id", "path_id", "node"]).reset_index(drop=True)


def _bytes(root: Path, sub: str) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted((root / sub).rglob("*.parquet"))}


def test_rescore_with_the_same_keys_reproduces_every_node_and_samples_nothing(source, tmp_path):
    out = tmp_path / "same"
    _rescore(source, out)
    assert _bytes(out, "rollouts") == _bytes(source, "rollouts") and _bytes(source, "rollouts")
    pd.testing.assert_frame_equal(_nodes(out), _nodes(source))
    rec = json.loads((out / RESCORED_FILE).read_text())
    assert rec["changed"] == {} and rec["runtime"] == {} and rec["source"] == str(source.resolve())
    q_src, q_out = (RunStore(r).read_table("questions.parquet") for r in (source, out))
    pd.testing.assert_frame_equal(q_out, q_src)
    assert "Scored again with `opdlens rescore`" in load_run(out).notes[0]
    assert "other hardware or precision" not in load_run(out).notes[0]


def test_rescore_on_another_dtype_says_so(source, tmp_path):
    out = tmp_path / "f64"
    _rescore(source, out, ["dtype=float64"])
    rec = json.loads((out / RESCORED_FILE).read_text())
    assert rec["changed"] == {} and rec["runtime"] == {"dtype": [None, "float64"]}
    assert "other hardware or precision than the source (`dtype`: null → float64)" in load_run(out).notes[0]


def test_rescore_under_our_scoring_changes_values_and_a_round_trip_gives_them_back(source, tmp_path):
    ours, back = tmp_path / "ours", tmp_path / "back"
    _rescore(source, ours, ["signals.min_visits=2"], scoring="opdlens")  # the source's own min_visits
    rec = json.loads((ours / RESCORED_FILE).read_text())
    assert rec["changed"]["tree_accounting"] == ["all-ancestors", "from-forced-node"]
    assert rec["changed"]["signals.restriction"] == ["literal", "renormalize"]
    assert rec["changed"]["stat_unit"] == ["question", "path"]  # not a result key, still a scoring choice
    a, b = _nodes(source), _nodes(ours)
    assert (a["n_children"].fillna(-1) != b["n_children"].fillna(-1)).any() or not a["align_gkd"].equals(b["align_gkd"])
    assert len(a) == len(b)  # the same paths and nodes
    _rescore(ours, back, ["signals.min_visits=2"], scoring="paper")
    pd.testing.assert_frame_equal(_nodes(back), a)


def test_rescore_refuses_keys_that_need_other_rollouts(source, tmp_path):
    with pytest.raises(OpdlensError, match=r"rollouts_per_question.*other rollouts"):
        _rescore(source, tmp_path / "x", ["rollouts_per_question=50"])
    with pytest.raises(OpdlensError, match=r"targeting\.visit_target"):
        _rescore(source, tmp_path / "x", ["targeting.visit_target=9"])
    assert not (tmp_path / "x").exists()


def test_rescore_refuses_an_unfinished_source_the_source_itself_and_a_foreign_out(source, tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    _diagnose(_dcfg(tmp_path, data))
    unfinished = tmp_path / "run"
    (unfinished / "questions.parquet").unlink()
    with pytest.raises(OpdlensError, match="not finished"):
        _rescore(unfinished, tmp_path / "o1")
    with pytest.raises(OpdlensError, match="another directory"):
        _rescore(source, source)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    for fresh, why in ((False, "already holds another run"), (True, "not a run directory")):
        with pytest.raises(OpdlensError, match=why):
            _rescore(source, foreign, fresh=fresh)
    assert (foreign / "keep.txt").read_text() == "x"
    with pytest.raises(OpdlensError, match="already holds another run"):
        _rescore(source, unfinished)
    _rescore(source, unfinished, fresh=True)  # another run: moved aside, then rescored
    assert (unfinished / RESCORED_FILE).is_file() and list(tmp_path.glob("run.old-*"))


def test_an_interrupted_rescore_resumes_with_the_same_command(source, tmp_path):
    out = tmp_path / "r"
    _rescore(source, out, ["signals.alignment_estimator=posterior_mean"])
    first = _nodes(out)
    victim = next((out / "nodes").rglob("*.parquet"))
    victim.unlink()  # as if stopped before this (teacher, question) was scored
    _rescore(source, out, ["signals.alignment_estimator=posterior_mean"])
    pd.testing.assert_frame_equal(_nodes(out), first)
    with pytest.raises(OpdlensError, match="already holds another run"):
        _rescore(source, out, ["signals.min_visits=3"])


def test_opdlens_rescore_command_writes_the_report(source, tmp_path):
    out = tmp_path / "cli"
    with mock.patch.object(drun, "build_diagnosis", _synthetic_builder(NO_SAMPLING)):
        args = ["rescore", str(source), "signals.min_visits=2", "--out", str(out), "--scoring", "opdlens"]
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = (out / "report" / "summary.md").read_text()
    assert "Scored again with `opdlens rescore`" in summary and "`tree_accounting`: all-ancestors" in summary
    bad = CliRunner().invoke(app, ["rescore", str(source), "--out", str(tmp_path / "b"), "seed=3"])
    assert bad.exit_code != 0 and "seed" in bad.output


def test_a_refusing_sampler_raises_before_the_model_samples():
    """The backstop of `Diagnosis.score_stored`: a sampler with a refusal reason never reaches the model."""
    from opdlens.diagnose.sampling import Sampler
    from opdlens.synthetic import SyntheticPolicy

    policy = SyntheticPolicy.random(seed=0, horizon=4)
    sampler = Sampler(policy, 1.0)
    sampler.refuse = "nothing may be sampled here"
    with pytest.raises(OpdlensError, match="nothing may be sampled here"):
        sampler.sample([[]], [2], 3, seed=0)
    sampler.refuse = None
    assert len(sampler.sample([[]], [2], 3, seed=0)[0]) == 2
