"""`opdlens train` and the diagnose -> train link (teacher configurations, contexts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.teachers import TeacherSpec
from opdlens.errors import OpdlensError
from opdlens.opd import cli as opd_cli
from opdlens.opd.run import train
from opdlens.opd.trainer import OPDTrainer
from tests.helpers import arith_questions, one_thread, tiny, tiny_train_config


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _diag() -> DiagnoseConfig:
    return DiagnoseConfig(
        student="smollm2",
        task="arith",
        max_new_tokens=32,
        seed=3,
        teachers=[
            TeacherSpec(name="Self-1C", context="1c"),
            TeacherSpec(name="Ext", model="/models/big", context="plain"),
            TeacherSpec(name="Self-Sum-1C", context="sum-1c"),
        ],
    )


def test_train_config_from_diagnose():
    cfg = opd_cli.train_config_from_diagnose(_diag(), "Self-1C", lr=2e-6, steps=5)
    assert (cfg.student, cfg.teacher, cfg.teacher_context, cfg.task) == ("smollm2", "smollm2", "1c", "arith")
    assert (cfg.max_new_tokens, cfg.seed, cfg.lr, cfg.steps) == (32, 3, 2e-6, 5)
    ext = opd_cli.train_config_from_diagnose(_diag(), "Ext")
    assert ext.teacher == "/models/big" and ext.teacher_context == "plain"
    with pytest.raises(OpdlensError, match="sum-1c"):
        opd_cli.train_config_from_diagnose(_diag(), "Self-Sum-1C")
    with pytest.raises(OpdlensError, match="known: Self-1C, Ext"):
        opd_cli.train_config_from_diagnose(_diag(), "Nope")


def test_load_train_config_from_diagnose_run(tmp_path, monkeypatch):
    run = tmp_path / "diag"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(_diag().model_dump(mode="json")))
    f = tmp_path / "train.yaml"
    f.write_text("from_diagnose: diag\nteacher_config: Ext\nbatch_size: 8\n")
    cfg = opd_cli.load_train_config(f)
    assert cfg.teacher == "/models/big" and cfg.batch_size == 8
    monkeypatch.setattr(opd_cli, "best_teacher", lambda run_dir, metric="align_gkd": "Self-1C")
    f.write_text("from_diagnose: diag\n")  # teacher_config defaults to best
    assert opd_cli.load_train_config(f).teacher_context == "1c"
    f.write_text("loss: full\nsteps: 2\n")  # a plain TrainConfig
    assert opd_cli.load_train_config(f).loss == "full"


class _AlwaysRight:
    name, max_new_tokens = "always", 4

    def check(self, text, q):
        return True


def test_self_distillation_context_shows_a_student_solution(tmp_path):
    student = tiny(0, init_std=0.2)
    _, qs = arith_questions(3)
    cfg = tiny_train_config(tmp_path, teacher_context="1c", steps=1, context_rollouts=2)
    res = train(
        cfg, student=student, teacher=tiny(0, init_std=0.2), task=_AlwaysRight(), train_questions=qs, eval_questions=[]
    )
    sols = json.loads((tmp_path / "solutions.json").read_text())
    assert set(sols) == {q.id for q in qs} and all(s["correct"] for s in sols.values())
    tr = OPDTrainer(
        cfg,
        student,
        tiny(0, init_std=0.2),
        _AlwaysRight(),
        qs,
        [],
        solutions={
            k: __import__("opdlens.diagnose.teachers", fromlist=["Solutions"]).Solutions(**v) for k, v in sols.items()
        },
    )
    msg = tr.teacher_messages(qs[0])[0]["content"]
    assert qs[0].prompt in msg and sols[qs[0].id]["correct"] in msg and "correct solution" in msg
    assert res.last_step == 1 and res.history[-1]["rkl"] > 0  # same weights, different context
    # with a real checker, a random model has no correct solution: a clear error
    with pytest.raises(OpdlensError, match="no training question has the needed solution"):
        train(
            cfg.model_copy(update={"out_dir": tmp_path / "b"}),
            student=student,
            teacher=tiny(1),
            task=arith_questions(1)[0],
            train_questions=qs,
            eval_questions=[],
        )


def test_train_cmd_end_to_end_from_yaml(tmp_path):
    """`opdlens train` on a saved tiny model: loads by path, trains 2 steps, logs, checkpoints."""
    pol = tiny(0, init_std=0.2)
    model_dir = tmp_path / "tiny"
    pol.model.save_pretrained(model_dir)
    pol.tokenizer.save_pretrained(model_dir)
    cfg = dict(
        student=str(model_dir),
        teacher=str(model_dir),
        teacher_template="answer_hint",
        steps=2,
        batch_size=2,
        micro_batch=2,
        max_new_tokens=4,
        lr=1e-3,
        eval_every=2,
        eval_questions=2,
        save_every=2,
        out_dir=str(tmp_path / "run"),
        device="cpu",
        k=4,
        metrics_k=4,
        progress=False,
        train_questions=8,
    )
    f = tmp_path / "train.yaml"
    f.write_text(yaml.safe_dump(cfg))
    from typer.testing import CliRunner

    from opdlens.cli import app

    r = CliRunner().invoke(app, ["train", str(f)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 1, 2]
    assert rows[1]["rkl"] > 0 and 0 <= rows[1]["overlap_ratio"] <= 1
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "state.json").is_file()
    f.write_text("steps: 0\nlr: -1\n")
    r = CliRunner().invoke(app, ["train", str(f)])
    assert r.exit_code == 2 and "lr must be > 0" in r.output


def test_documented_example_config_is_valid(tmp_path):
    doc = opd_cli.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    f = tmp_path / "example.yaml"
    f.write_text("\n".join(line[4:] for line in block.splitlines()))
    cfg = opd_cli.load_train_config(f)
    assert (cfg.loss, cfg.k, cfg.batch_size, cfg.lr, cfg.teacher_template) == ("opd", 16, 64, 1e-6, "answer_hint")


def test_every_example_train_config_is_valid():
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("train-*.yaml"))
    assert len(files) >= 4
    for f in files:
        cfg = opd_cli.load_train_config(f)
        assert cfg.loss == "opd", f


def test_opd_demo_and_module_entry_point(tmp_path, capsys):
    """`python -m opdlens.opd.demo` (plain and --compare-templates) and `python -m opdlens.opd
    CONFIG.yaml` on a saved tiny model: they run, write what their docs promise, and the module
    entry point turns bad input into exit status 2."""
    import math

    from opdlens.opd import demo
    from opdlens.opd.__main__ import main as module_main

    pol = tiny(0, init_std=0.2)
    model_dir = tmp_path / "tiny"
    pol.model.save_pretrained(model_dir)
    pol.tokenizer.save_pretrained(model_dir)
    common = [
        "--model",
        str(model_dir),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "4",
        "--eval-questions",
        "2",
        "--eval-every",
        "1",
        "--threads",
        "1",
    ]
    s = demo.main(common + ["--steps", "2", "--out-dir", str(tmp_path / "demo")])
    assert s["steps"] == 2
    assert math.isfinite(s["eval_rkl_start"]) and s["eval_rkl_start"] > 0  # a context-bearing teacher differs
    assert s["eval_rkl_change_pct"] == pytest.approx(
        100 * (s["eval_rkl_end"] - s["eval_rkl_start"]) / s["eval_rkl_start"]
    )
    assert (tmp_path / "demo" / "rkl_curve.png").stat().st_size > 0
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == s
    c = demo.main(common + ["--steps", "1", "--compare-templates", "--out-dir", str(tmp_path / "cmp")])
    assert set(c) == {"aligned", "misaligned"}
    for r in c.values():
        assert 0 <= r["initial_overlap_ratio"] <= 1
        assert r["eval_rkl_gain"] == pytest.approx(r["eval_rkl_start"] - r["eval_rkl_end"])
    assert c["aligned"]["eval_rkl_start"] != c["misaligned"]["eval_rkl_start"]  # the template reached the teacher

    with pytest.raises(SystemExit) as exit_:
        module_main([])  # no config: a usage error
    assert exit_.value.code == 2
    f = tmp_path / "train.yaml"
    f.write_text(
        yaml.safe_dump(
            dict(
                student=str(model_dir),
                teacher=str(model_dir),
                steps=1,
                batch_size=2,
                micro_batch=2,
                max_new_tokens=4,
                eval_every=0,
                save_every=0,
                device="cpu",
                k=4,
                metrics_k=4,
                progress=False,
                train_questions=4,
                out_dir=str(tmp_path / "mod"),
            )
        )
    )
    assert module_main([str(f)]).last_step == 1
    rows = [json.loads(x) for x in (tmp_path / "mod" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "rkl" in r][-1] == 1
    f.write_text("steps: 0\nlr: -1\n")
    with pytest.raises(SystemExit) as exit_:
        module_main([str(f)])  # an invalid config: OpdlensError, printed
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err
