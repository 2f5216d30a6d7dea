"""The command line: report building (with an OPD training curve) and readable failures."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from opdlens.cli import app
from opdlens.report.figures import plot_training_curve
from tests.test_pipeline import _setup

runner = CliRunner()


def test_report_command_embeds_training_curve(tmp_path):
    diag, envs = _setup(tmp_path / "run")
    diag.run(envs)
    train_dir = tmp_path / "opd"
    train_dir.mkdir()
    rows = [{"step": s, "rkl": 0.5 / (s + 1), "overlap_ratio": 0.8 + 0.01 * s} for s in range(5)]
    rows += [{"step": s, "eval_rkl": 0.4 / (s + 1)} for s in (0, 4)]
    (train_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    png = plot_training_curve(rows, train_dir / "rkl_curve.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    res = runner.invoke(app, ["report", str(tmp_path / "run"), "--train", str(train_dir)])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "OPD training: opd" in html
    assert "helpful" in html and "harmful" in html
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "OPD training: opd" in summary


def test_report_command_errors_are_readable(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2
    assert "does not exist" in res.output and "opdlens diagnose" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert res.exit_code == 2
    assert "no per-node results" in res.output and "opdlens diagnose" in res.output
    assert not (tmp_path / "nothing").exists()  # a report never creates a run directory
    diag, envs = _setup(tmp_path / "run")
    diag.run(envs)
    res = runner.invoke(app, ["report", str(tmp_path / "run"), "--train", str(tmp_path)])
    assert res.exit_code == 2 and "rkl_curve.png" in res.output


def test_version_and_report_out(tmp_path):
    from opdlens import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"opdlens {__version__}"
    diag, envs = _setup(tmp_path / "run")
    diag.run(envs)
    res = runner.invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "elsewhere" / "index.html").is_file() and not (tmp_path / "run" / "report").exists()


def test_report_on_an_interrupted_run_is_partial(tmp_path):
    import pytest

    # question by question (resident): kill after q0's sampling calls and two of q1's, so q0 is
    # scored and q1 is not
    probe, probe_envs = _setup(tmp_path / "probe")
    probe.config.schedule = "resident"
    real, calls = probe.student.sample, [0]

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return real(*a, **kw)

    probe.student.sample = counting
    probe.run(probe_envs[:1])
    diag, envs = _setup(tmp_path / "run", fail_after=calls[0] + 2)
    diag.config.schedule = "resident"
    with pytest.raises(KeyboardInterrupt):
        diag.run(envs)
    assert not (tmp_path / "run" / "questions.parquet").exists()
    res = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 3, res.output
    out = " ".join(res.output.split())
    assert "partial: PARTIAL RUN: 1 question(s) scored so far" in out and "Traceback" not in out
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert summary.splitlines()[2] == "## The answer" and "PARTIAL RUN" in summary.splitlines()[4]
    q = __import__("pandas").read_csv(tmp_path / "run" / "report" / "questions.csv")
    init = diag.store.read_chunk("q0", "initial")
    assert q["question_id"].tolist() == ["q0"] and q["n_rollouts"].tolist() == [len(init)]
    assert q["success_rate"].iloc[0] == init.success_rate


def test_diagnose_without_a_report_exits_non_zero(tmp_path, monkeypatch):
    import opdlens.diagnose.run

    def no_valid_nodes(cfg, fresh=False):
        diag, envs = _setup(tmp_path / "run")
        diag.config.signals = diag.config.signals.model_copy(update={"min_visits": 10_000})
        diag.run(envs)
        return diag.store

    monkeypatch.setattr(opdlens.diagnose.run, "diagnose", no_valid_nodes)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"out_dir: {tmp_path / 'run'}\n")
    res = runner.invoke(app, ["diagnose", str(cfg)])
    assert res.exit_code == 4, res.output
    assert "no report:" in res.output


def test_unknown_hub_id_fails_fast_with_the_whole_message(tmp_path, monkeypatch):
    import time

    import huggingface_hub.constants as hc

    from opdlens import models

    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the hub is unreachable
    monkeypatch.setattr(models.sources, "_HUB_REACHABLE", {})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"student: no-such-org/no-such-model\nout_dir: {tmp_path / 'run'}\n")
    start = time.perf_counter()
    res = runner.invoke(app, ["diagnose", str(cfg)])
    assert time.perf_counter() - start < 10
    msg = " ".join(res.output.split())
    assert res.exit_code == 2 and msg.startswith("error: could not find model 'no-such-org/no-such-model'")
    assert "hub is unreachable or offline" in msg and msg.endswith("a downloaded snapshot).")


def test_interrupted_diagnose_says_how_to_resume(tmp_path, monkeypatch):
    """Ctrl-C during a run: exit code 130 and the message that the finished rollouts are kept."""
    import opdlens.diagnose.run

    seen = {}

    def interrupted(cfg, fresh=False):
        seen["fresh"] = fresh
        raise KeyboardInterrupt

    monkeypatch.setattr(opdlens.diagnose.run, "diagnose", interrupted)
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "run"), "--fresh"])
    assert res.exit_code == 130, res.output
    assert "interrupted" in res.output and "rerun the same command to resume" in res.output
    assert str(tmp_path / "run") in res.output
    assert seen == {"fresh": True}


@pytest.mark.slow
def test_demo_command_runs_the_main_job(tmp_path):
    """`opdlens demo` (the README's main job) on one question: it diagnoses the embedded SmolLM2,
    writes the report and says where it is; run again, it resumes and rewrites the same report."""
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--out", str(out), "--questions", "1"])
    assert res.exit_code == 0, res.output
    assert "diagnosing smollm2 on 1 'arith' questions" in res.output
    assert f"report: {out / 'report' / 'index.html'}\n" in res.output  # a path is never wrapped: it can be copied
    summary = (out / "report" / "summary.md").read_text()
    assert all(t in summary for t in ("Self-1C", "Self-Sum-1C", "Self-1C1W"))
    chunks = sorted(p.name for p in out.rglob("*.parquet"))
    res = runner.invoke(app, ["demo", "--out", str(out), "--questions", "1"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.rglob("*.parquet")) == chunks
    assert (out / "report" / "summary.md").read_text() == summary
