"""The paper's protocol on tiny Qwen3 models: thinking switches, recorded skips (no silent
fallback, no leaked solution), the `protocol: paper` preset and the model schedule."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from opdlens.diagnose.config import PAPER_PRESET, DiagnoseConfig
from opdlens.diagnose.run import build_diagnosis, diagnose, write_config
from opdlens.diagnose.store import RunStore
from opdlens.errors import OpdlensError
from opdlens.models import SMOLLM2, load_tokenizer, tiny_random_policy
from opdlens.report.run import load_results
from opdlens.tasks import Grade, Question, Task, register_task, strip_thinking

#: A Qwen3-like chat template with the enable_thinking switch (test-only).
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


@register_task
class ParityTask(Task):
    """Succeeds when the answer part of the completion has an even number of characters (about
    half of a random model's samples): a checkable task for tiny random models."""

    name = "test-parity"
    max_new_tokens = 6

    def load(self, split="test", n=None, seed=0, **kw):  # type: ignore[no-untyped-def]
        qs = [Question(id=f"p{i}", prompt=f"Question {i}: say anything.", answer="even") for i in range(3)]
        return qs[: n or len(qs)]

    def grade(self, text, question):  # type: ignore[no-untyped-def]
        body = strip_thinking(text)
        if body is None:
            return Grade(False, None, "unterminated <think> (no answer)")
        ok = len(body) % 2 == 0
        return Grade(ok, "even" if ok else "odd", "correct" if ok else "incorrect")


@pytest.fixture(scope="module")
def qwen3_dirs(tmp_path_factory):
    """Tiny random Qwen3 student and teacher saved as model directories (real loading code),
    with a tokenizer whose chat template has the thinking switch."""
    root = tmp_path_factory.mktemp("models")
    tok = copy.deepcopy(load_tokenizer(SMOLLM2))
    tok.chat_template = THINKING_TEMPLATE
    out = {}
    for name, seed in (("student", 0), ("teacher", 1)):
        pol = tiny_random_policy(seed=seed, model_type="qwen3", init_std=0.5, tokenizer=SMOLLM2)
        pol.model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _config(dirs, out, **kw) -> DiagnoseConfig:
    base = dict(
        student=dirs["student"],
        task="test-parity",
        n_questions=2,
        rollouts_per_question=16,
        max_new_tokens=6,
        thinking=False,
        summarizer=dirs["teacher"],
        summarizer_thinking=False,
        summary_max_new_tokens=8,
        solution_model=dirs["teacher"],
        solution_thinking=False,
        teachers=[
            {"name": "Self-1C", "context": "1c"},
            {"name": "Self-Sum-1C", "context": "sum-1c"},
            {"name": "Self-1C1W", "context": "1c1w"},
            {"name": "Self-1C(ext)", "context": "1c-ext"},
            {"name": "Ext", "model": dirs["teacher"], "thinking": True},
        ],
        targeting={
            "first_window": 2,
            "per_window_gkd": 1,
            "per_window_gap": 1,
            "visit_target": 6,
            "max_rollouts_per_path": 12,
        },
        signals={"min_visits": 2},
        out_dir=str(out),
    )
    base.update(kw)
    return DiagnoseConfig.model_validate(base)


def test_encode_chat_passes_the_thinking_switch(qwen3_dirs):
    from opdlens.models import chat_encoder

    msgs = [{"role": "user", "content": "hi"}]
    off = chat_encoder(qwen3_dirs["student"], thinking=False)(msgs)
    default = chat_encoder(qwen3_dirs["student"])(msgs)
    tok = load_tokenizer(qwen3_dirs["student"])
    assert tok.decode(off).endswith("<think>\n\n</think>\n\n") and not tok.decode(default).endswith("</think>\n\n")
    assert off[: len(default)] == default
    plain = tiny_random_policy(seed=0)  # SmolLM2's template has no switch
    with pytest.raises(OpdlensError, match="no enable_thinking switch"):
        plain.encode_chat(msgs, thinking=False)
    assert plain.encode_chat(msgs) == plain.encode_chat(msgs, thinking=None)


def test_paper_preset_fills_only_unset_keys():
    cfg = DiagnoseConfig(protocol="paper")
    assert cfg.signals.restriction == "literal" and cfg.tree_accounting == "all-ancestors"
    assert cfg.stat_unit == "question" and cfg.targeting.visit_target == 100
    mine = DiagnoseConfig.model_validate(
        {"protocol": "paper", "signals": {"min_visits": 10}, "tree_accounting": "from-forced-node"}
    )
    assert mine.signals.min_visits == 10 and mine.signals.restriction == "literal"
    assert mine.tree_accounting == "from-forced-node"
    ours = DiagnoseConfig()
    assert ours.signals.restriction == "renormalize" and ours.stat_unit == "path"
    # every preset key is a real config key (a typo in the preset would be an error)
    assert set(PAPER_PRESET) <= set(DiagnoseConfig.model_fields)
    assert cfg.choices()["protocol"] == "paper" and ours.choices()["restriction to S_u"] == "renormalize"
    # the alignment estimator: ours is the posterior mean, the paper's the plug-in (also under other signal keys)
    assert ours.signals.alignment_estimator == "posterior_mean" and cfg.signals.alignment_estimator == "plugin"
    assert mine.signals.alignment_estimator == "plugin"
    assert (
        ours.choices()["alignment estimator"] == "posterior_mean" and cfg.choices()["alignment estimator"] == "plugin"
    )


@pytest.mark.parametrize("protocol", ["opdlens", "paper"])
def test_protocol_runs_end_to_end_with_recorded_skips(qwen3_dirs, tmp_path, protocol):
    cfg = _config(qwen3_dirs, tmp_path / protocol, protocol=protocol)
    write_config(RunStore(cfg.out_dir), cfg)
    diag, envs = build_diagnosis(cfg, progress=False)
    ext = next(t for t in diag.teachers if t.spec.name == "Ext")
    assert not ext.slot.loaded  # scheduled: not loaded before its step
    diag.run(envs)
    # each scheduled model is freed after its steps; the teacher is loaded for priorities and scoring
    assert not ext.slot.loaded and ext.slot.loads == 3  # one model: solutions+summaries, priorities, scoring
    assert not diag.runtime.summarizer.loaded and not diag.runtime.solution_slot.loaded
    store = RunStore(cfg.out_dir)
    nodes, questions, paths = load_results(store)
    assert "Ext" in set(nodes["teacher"]) and len(questions) == 2
    valid = nodes[nodes["valid"].astype(bool)]
    assert len(valid) and valid["pbar"].between(0, 1).all()  # the P̄ of every valid node reaches the table
    skips = store.read_table("skips.parquet")
    assert list(skips.columns) == ["question_id", "teacher", "action", "reason"]
    for q in questions["question_id"]:
        sol = store.read_table(f"solutions/{q}.parquet").iloc[0]
        reasons = json.loads(sol["reasons"])
        shown = {sol["correct"], sol["wrong"]} - {None}
        scored = set(paths[paths.question_id == q]["text"])
        assert not (shown & scored)  # the shown solution is never a scored path
        for name, teacher in (("correct", "Self-1C"), ("wrong", "Self-1C1W")):
            if sol[name] is None:  # missing: a recorded skip with its reason, no substitute
                row = skips[(skips.question_id == q) & (skips.teacher == teacher)]
                assert len(row) == 1 and row["action"].iloc[0] == "skipped"
                assert row["reason"].iloc[0] == reasons[name]
                assert not ((nodes.question_id == q) & (nodes.teacher == teacher)).any()
        if sol["correct_summary"] is not None:
            assert "<think>" not in sol["correct_summary"] and "</think>" not in sol["correct_summary"]
    # choices in the report
    from opdlens.cli import _report

    index, partial = _report(store.root)
    assert not partial
    summary = (index.parent / "summary.md").read_text()
    assert "## Choices of this run" in summary
    from opdlens.diagnose.uncertainty import count_settled

    for r in count_settled(nodes).itertuples():  # the per-node intervals reach the report
        assert f"{r.teacher} {r.n_settled} of {r.n_valid} valid nodes ({r.n_settled_pos} positive)" in summary
    assert ("`literal`" in summary) == (protocol == "paper")
    assert ("`question`" in summary) == (protocol == "paper")
    estimator = "plugin" if protocol == "paper" else "posterior_mean"
    assert f"- alignment estimator: `{estimator}`" in summary


def test_fallback_is_opt_in_and_recorded(qwen3_dirs, tmp_path):
    # no correct rollout can ever be shown: n_correct_paths takes every correct one
    teachers = [{"name": "Self-1C", "context": "1c"}]
    common = dict(
        teachers=teachers,
        n_correct_paths=16,
        n_incorrect_paths=0,
        rollouts_per_question=8,
        summarizer=None,
        solution_model=None,
        targeting={"visit_target": 1},
    )
    strict = _config(qwen3_dirs, tmp_path / "strict", **common)
    diag, envs = build_diagnosis(strict, progress=False)
    with pytest.raises(OpdlensError, match="no per-node results|all .* skipped"):
        diag.run(envs)
        load_results(diag.store)
    skips = diag.store.read_table("skips.parquet")
    assert (skips["action"] == "skipped").all() and skips["reason"].str.contains("scored representative path").any()
    loose = _config(qwen3_dirs, tmp_path / "loose", fallback_reference_solution=True, **common)
    diagnose(loose, progress=False)
    store = RunStore(loose.out_dir)
    skips = store.read_table("skips.parquet")
    fb = skips[skips["action"] == "fallback"]
    assert len(fb) == 2 and set(fb["teacher"]) == {"Self-1C"} and fb["reason"].str.contains("reference").all()
    assert set(load_results(store)[0]["teacher"]) == {"Self-1C"}


def test_schedules_give_identical_results(qwen3_dirs, tmp_path):
    small = dict(
        n_questions=1,
        teachers=[{"name": "Self-1C", "context": "1c"}, {"name": "Ext", "model": qwen3_dirs["teacher"]}],
        summarizer=None,
        solution_model=None,
    )
    seq = _config(qwen3_dirs, tmp_path / "seq", **small)
    res = _config(qwen3_dirs, tmp_path / "res", schedule="resident", **small)
    diagnose(seq, progress=False)
    diagnose(res, progress=False)
    a, b = load_results(RunStore(seq.out_dir))[0], load_results(RunStore(res.out_dir))[0]
    key = ["teacher", "question_id", "path_id", "node"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True))


def test_shipped_configs_validate():
    from pathlib import Path

    files = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    paper = [f for f in files if f.name.startswith("paper-")]
    assert len(paper) == 6  # {boolq, mmlu, aime} x {Qwen3-0.6B, 1.7B}
    for f in files:
        if f.name.startswith("train"):
            continue
        cfg = DiagnoseConfig.from_yaml(f)
        if f in paper:
            assert cfg.protocol == "paper" and cfg.signals.restriction == "literal" and len(cfg.teachers) == 8
            assert cfg.signals.min_visits == (10 if "aime" in f.name else 20)


def test_report_mentions_forced_pm1_only_under_renormalisation(tmp_path):
    from opdlens.report import write_report

    rows = []
    for teacher in ("A",):  # noqa: B007
        for pid, correct in ((0, True), (1, False)):
            for u, (a, k) in enumerate(((1.0, 2), (-0.3, 3), (0.4, 2))):
                rows.append(
                    {
                        "question_id": "q",
                        "path_id": pid,
                        "path_correct": correct,
                        "teacher": teacher,
                        "node": u,
                        "depth_norm": u / 3,
                        "token_id": u,
                        "token_text": f"t{u}",
                        "valid": True,
                        "n_children": k,
                        "visits": 30,
                        "p_student": 0.5,
                        "p_teacher": 0.4,
                        "psucc_token": 0.5,
                        "teacher_adv": 0.1,
                        "align_gkd": a,
                        "align_single": a,
                        "align_minillm": a,
                        "align_drgrpo": a,
                        "norm_ideal": 1.0,
                        "norm_gkd": 1.0,
                        "kl": 0.1,
                        "js": 0.1,
                        "l2": 0.1,
                        "cos_prob": 0.9,
                    }
                )
    nodes = pd.DataFrame(rows)
    questions = pd.DataFrame({"question_id": ["q"], "n_rollouts": [8], "success_rate": [0.5], "n_targeted": [0]})
    paths = pd.DataFrame(
        {"question_id": ["q", "q"], "path_id": [0, 1], "correct": [True, False], "length": [3, 3], "text": ["a", "b"]}
    )
    ren = write_report(
        tmp_path / "ren",
        nodes,
        questions,
        paths,
        choices={"restriction to S_u": "renormalize", "alignment estimator": "posterior_mean"},
    )
    plug = write_report(
        tmp_path / "plug",
        nodes,
        questions,
        paths,
        choices={"restriction to S_u": "renormalize", "alignment estimator": "plugin"},
    )
    lit = write_report(
        tmp_path / "lit",
        nodes,
        questions,
        paths,
        choices={"restriction to S_u": "literal", "alignment estimator": "posterior_mean"},
    )
    md_ren, md_plug, md_lit = ((r.parent / "summary.md").read_text() for r in (ren, plug, lit))
    assert "by construction" in md_ren and "by construction" in md_plug and "by construction" not in md_lit
    # the note says what the run's estimator reports for a two-child node, and the choices list the estimator
    assert "the posterior-mean estimate is 2P - 1" in md_ren and "the plug-in estimate is that ±1" not in md_ren
    assert "the plug-in estimate is that ±1" in md_plug and "2P - 1" not in md_plug
    assert "- alignment estimator: `posterior_mean`" in md_ren and "- alignment estimator: `plugin`" in md_plug
    tips = {name: r.read_text() for name, r in (("ren", ren), ("plug", plug), ("lit", lit))}
    assert "shown: 2P - 1, P = probability the sign is + (posterior mean)" in tips["ren"]
    assert "shown: that sign (plug-in)" in tips["plug"] and "(2 children:" not in tips["lit"]


def test_runs_written_before_a_key_existed_keep_the_value_they_ran_with(tmp_path):
    """A stored configuration without ``signals.alignment_estimator`` / ``targeting.scope`` ran with
    the plug-in and the chosen pairs: the report says so and a resume under today's defaults
    (posterior mean, every node) is refused instead of mixing two estimators in one run."""
    import yaml

    from opdlens.config import describe_mismatch, result_keys, stored_result_keys
    from opdlens.diagnose.config import DiagnoseConfig, demo_config, read_run_config

    cfg = demo_config(str(tmp_path / "run")).model_dump(mode="json")
    del cfg["signals"]["alignment_estimator"], cfg["targeting"]["scope"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    old = read_run_config(tmp_path / "config.yaml")
    assert old.signals.alignment_estimator == "plugin" and old.targeting.scope == "pairs"
    now = demo_config(str(tmp_path / "run"))
    assert now.signals.alignment_estimator == "posterior_mean" and now.targeting.scope == "nodes"
    stored = stored_result_keys(tmp_path, DiagnoseConfig)
    assert stored is not None and stored["signals"]["alignment_estimator"] == "plugin"
    assert "signals.alignment_estimator: 'plugin' -> 'posterior_mean'" in (
        describe_mismatch(stored, result_keys(now)) or ""
    )
