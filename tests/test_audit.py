"""The loss audit (opdlens.audit) on the synthetic DP oracle: the audit of the full reverse KL is
the run's align_gkd, of Dr. GRPO its align_drgrpo (and MiniLLM its align_minillm), under both
restrictions and both estimators; sampled-token expectations; the no-op flag; user losses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from opdlens.audit.gradients import expected_gradient
from opdlens.audit.losses import default_losses, select_losses, user_loss
from opdlens.audit.run import audit_nodes
from opdlens.diagnose.signals import SignalConfig
from opdlens.errors import OpdlensError
from tests.helpers import SyntheticFactory, one_thread

RUN_METRIC = {"full[T=1]": "align_gkd", "drgrpo": "align_drgrpo", "minillm": "align_minillm"}


def oracle_run(tmp_path, restriction="renormalize", estimator="posterior_mean", n_questions=1):
    f = SyntheticFactory(n_questions=n_questions)
    f.options = f.options.model_copy(
        update={"signals": SignalConfig(min_visits=10, restriction=restriction, alignment_estimator=estimator)}
    )
    diag, envs = f(str(tmp_path / "run"))
    diag.run(envs)
    return diag, envs


@pytest.mark.parametrize("restriction", ["renormalize", "literal"])
@pytest.mark.parametrize("estimator", ["plugin", "posterior_mean"])
def test_audit_reproduces_the_runs_alignment(tmp_path, restriction, estimator):
    with one_thread():
        diag, envs = oracle_run(tmp_path, restriction, estimator)
        losses = select_losses(list(RUN_METRIC))
        audit = audit_nodes(diag, envs, losses)
    run = diag.store.read_all("nodes")
    run = run[run["valid"].astype(bool)]
    keys = ["teacher", "question_id", "path_id", "node"]
    assert len(run) > 10
    for loss, metric in RUN_METRIC.items():
        a = audit[audit["loss"] == loss].merge(run[[*keys, metric]], on=keys, validate="1:1")
        assert len(a) == len(run)
        x, y = a["align"].to_numpy(dtype=float), a[metric].to_numpy(dtype=float)
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
        np.testing.assert_allclose(x[np.isfinite(x)], y[np.isfinite(y)], atol=1e-6, rtol=0, err_msg=loss)
        assert np.isfinite(x).sum() > 10


USER_LOSSES = '''
import torch


def penalty(student_logits, teacher_logits, tokens, mask):
    """An action-independent penalty: REINFORCE with the same reward for every token."""
    logp = torch.log_softmax(student_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return 0.3 * logp


def rkl(student_logits, teacher_logits, tokens, mask):
    """Full reverse KL, written by a user."""
    logp, logq = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1)
'''


def _cli_run(tmp_path, monkeypatch):
    """An oracle run with a config.yaml, whose `build_diagnosis` rebuilds the oracle's models."""
    import opdlens.diagnose.run as diagnose_run

    f = SyntheticFactory(n_questions=1)
    out = tmp_path / "run"
    diag, envs = f(str(out))
    with one_thread():
        diag.run(envs)
    diagnose_run.write_config(diag.store, f.options.model_copy(update={"out_dir": str(out)}))
    monkeypatch.setattr(diagnose_run, "build_diagnosis", lambda config, progress=True: f(config.out_dir))
    return out


def test_user_loss_end_to_end_and_no_op(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from opdlens.cli import app

    (tmp_path / "mylosses.py").write_text(USER_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _cli_run(tmp_path, monkeypatch)
    args = ["audit", str(run), "--losses", "full[T=1]", "--losses", "opd[student,*,k=4,T=1]"]
    args += ["--loss", "mylosses:penalty", "--loss", f"{tmp_path / 'mylosses.py'}:rkl"]
    with one_thread():
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(run / "audit" / "losses.csv")
    assert set(table["loss"]) >= {"full[T=1]", "opd[student,student,k=4,T=1]", "mylosses:penalty"}
    pen = table[table["loss"] == "mylosses:penalty"]
    assert (pen["frac_noop"] == 1.0).all() and pen["mean"].isna().all()
    nodes = pd.read_parquet(run / "audit" / "nodes.parquet")
    full = nodes[nodes["loss"] == "full[T=1]"]["align"].to_numpy()
    mine = nodes[nodes["loss"] == f"{tmp_path / 'mylosses.py'}:rkl"]["align"].to_numpy()
    np.testing.assert_allclose(mine, full, atol=1e-9)
    assert not nodes[nodes["loss"] == "full[T=1]"]["noop"].any()
    for f in ("summary.md", "table.csv", "table.md", "correct_vs_incorrect.csv", "alignment_vs_k.png"):
        assert (run / "audit" / f).is_file(), f
    assert "loss audit of 6 losses" in (run / "report" / "summary.md").read_text()


def test_bad_losses_are_readable():
    with pytest.raises(OpdlensError, match="matches no audited loss"):
        select_losses(["nope*"])
    with pytest.raises(OpdlensError, match="module:function"):
        user_loss("nocolon")
    with pytest.raises(OpdlensError, match="cannot import"):
        user_loss("no_such_module_xyz:f")
    with pytest.raises(OpdlensError, match="has no function"):
        user_loss("math:no_such_function")


@pytest.mark.parametrize("name", ["opd[k=0,T=1]", "k2_reward", "k3_loss"])
def test_sampled_token_expectation_is_the_mean_of_sampled_gradients(name):
    """The exact expectation over the student's token equals the mean of many sampled-token
    gradients (each by autograd of the loss at one sampled token), within 5 standard errors."""
    g = torch.Generator().manual_seed(0)
    vocab, n = 12, 40_000
    lp = torch.log_softmax(2 * torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    lq = torch.log_softmax(2 * torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    loss = {x.name: x for x in default_losses()}[name]
    exact = expected_gradient(loss, lp, lq)
    toks = torch.multinomial(lp.exp(), n, replacement=True, generator=g)
    z = lp.expand(n, vocab).clone().requires_grad_(True)
    one = torch.ones(n, 1, dtype=torch.float64)
    loss.fn(z.unsqueeze(1), lq.expand(n, vocab).unsqueeze(1), toks.unsqueeze(1), one, 0 * one).backward()
    per = z.grad  # each row: the gradient at one sampled token
    se = per.std(0) / n**0.5
    assert (exact - per.mean(0)).abs().le(5 * se + 1e-12).all()
    assert exact.abs().max() > 10 * se.max()  # the test can tell a wrong expectation from noise


def test_expected_gradient_of_the_reverse_kl_is_analytic():
    """Sampled-token OPD and the full reverse KL have the same expected gradient p (ℓ − KL)."""
    g = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64), -1)
    lq = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64), -1)
    p, ell = lp.exp(), lp - lq
    analytic = p * (ell - (p * ell).sum())
    losses = {x.name: x for x in default_losses()}
    for name in ("full[T=1]", "opd[k=0,T=1]", "sampled[T=1]", "k1_reward", "opd[student,student,k=64,T=1]"):
        assert torch.allclose(expected_gradient(losses[name], lp, lq), analytic, atol=1e-6), name


def test_audit_every_logs_what_a_standalone_audit_of_the_checkpoint_gives(tmp_path, monkeypatch):
    """A probe diagnose run on tiny random HF models (a parity grader gives branches with mixed
    outcomes); 2 OPD steps with audit_every 2 and a checkpoint at step 2: the logged alignment per
    teacher equals a standalone audit of the checkpoint's student on the probe."""
    import opdlens.diagnose.run as diagnose_run
    from opdlens.audit.probe import TrainingProbe, training_loss
    from opdlens.diagnose.config import DiagnoseConfig
    from opdlens.diagnose.diagnosis import Diagnosis
    from opdlens.diagnose.questions import QuestionEnv
    from opdlens.diagnose.schedule import Teacher
    from opdlens.diagnose.store import RunStore
    from opdlens.diagnose.targeting import TargetingConfig
    from opdlens.diagnose.teachers import TeacherSpec
    from opdlens.opd import checkpoint as ckpt
    from opdlens.opd.config import TrainConfig
    from opdlens.opd.run import train
    from opdlens.opd.runlog import read_metrics
    from tests.helpers import arith_questions, tiny

    options = DiagnoseConfig(
        rollouts_per_question=32,
        max_new_tokens=3,
        chunk_rollouts=32,
        n_correct_paths=2,
        n_incorrect_paths=2,
        targeting=TargetingConfig(first_window=1, per_window_gkd=1, per_window_gap=1, visit_target=8),
        signals=SignalConfig(min_visits=3),
    )
    probe_dir = tmp_path / "probe"

    def build(config=None, progress=True):
        student = tiny(0, init_std=1.0)
        teachers = [Teacher(TeacherSpec(name="other", model="tiny"), tiny(1, init_std=1.0))]
        envs = [QuestionEnv(id="q0", prompt_ids=[1, 2, 3], grade=lambda toks: sum(toks) % 2 == 0)]
        return Diagnosis(RunStore(str(probe_dir)), student, teachers, options, progress=False), envs

    with one_thread():
        diag, envs = build()
        diag.run(envs)
        diagnose_run.write_config(diag.store, options.model_copy(update={"out_dir": str(probe_dir)}))
        assert diag.store.read_all("nodes")["valid"].sum() >= 3
        monkeypatch.setattr(diagnose_run, "build_diagnosis", build)
        task, qs = arith_questions(8)
        cfg = TrainConfig(
            batch_size=2,
            micro_batch=2,
            max_new_tokens=4,
            steps=2,
            lr=3e-2,
            eval_every=0,
            save_every=2,
            out_dir=tmp_path / "opd",
            progress=False,
            tensorboard=False,
            loss="full",
            device="cpu",
            audit_every=2,
            audit_probe=str(probe_dir),
        )
        train(
            cfg,
            student=tiny(0, init_std=1.0),
            teacher=tiny(1, init_std=1.0),
            task=task,
            train_questions=qs,
            eval_questions=[],
        )
        logged = read_metrics(tmp_path / "opd")[-1]
        key = "audit/align[full][other]"
        assert logged["step"] == 2 and key in logged and np.isfinite(logged[key])
        fresh = tiny(5, init_std=1.0)
        ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "opd")[-1][1], fresh.model, None)
        d2, e2 = build()
        probe = TrainingProbe(d2, e2, training_loss(cfg))
        standalone, untrained = probe.measure(fresh), probe.measure(tiny(0, init_std=1.0))
    assert standalone[key] == pytest.approx(logged[key], abs=1e-9)
    assert untrained[key] != pytest.approx(logged[key], abs=1e-6)  # training moved the student
