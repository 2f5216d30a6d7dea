"""The command line: report building (with an OPD training curve) and readable failures."""

from __future__ import annotations

import json

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
