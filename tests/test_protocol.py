"""The paper's protocol on tiny Qwen3 models: thinking switches, recorded skips (no silent
fallback, no leaked solution), the `protocol: paper` preset and the model schedule."""

from __future__ import annotations

import copy
import json
import re

import pandas as pd
import pytest

from opdlens.diagnose.choices import run_choices
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


#: Paper A's six settings: {boolq, mmlu, aime} x {Qwen3-0.6B, 1.7B} (paper-b-*: paper B's training).
PAPER_A_CONFIG = re.compile(r"paper-(boolq|mmlu|aime)-qwen3-[0-9.]+b\.yaml")


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
    assert run_choices(cfg)["protocol"] == "paper" and run_choices(ours)["restriction to S_u"] == "renormalize"
    # the alignment estimator: ours is the posterior mean, the paper's the plug-in (also under other signal keys)
    assert ours.signals.alignment_estimator == "posterior_mean" and cfg.signals.alignment_estimator == "plugin"
    assert mine.signals.alignment_estimator == "plugin"
    assert (
        run_choices(ours)["alignment estimator"] == "posterior_mean"
        and run_choices(cfg)["alignment estimator"] == "plugin"
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
    paper = [f for f in files if PAPER_A_CONFIG.fullmatch(f.name)]
    assert len(paper) == 6  # {boolq, mmlu, aime} x {Qwen3-0.6B, 1.7B}
    for f in files:
        if f.name.startswith(("train", "paper-b-")):  # training configs (paper B's setup included)
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

    from opdlens.diagnose.config import DiagnoseConfig, demo_config, read_run_config
    from opdlens.identity import describe_mismatch, result_keys, stored_result_keys

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


# --------------------------------------------------------------------------------------------
# every choice is one registered key (issue 27, items 3, 6, 10)
# --------------------------------------------------------------------------------------------


def _dotted(tree: dict, prefix: str = "") -> set[str]:
    """Dotted leaf keys of a nested mapping (one level of nesting, as the preset)."""
    out: set[str] = set()
    for k, v in tree.items():
        name = f"{prefix}{k}"
        out |= _dotted(v, f"{name}.") if isinstance(v, dict) else {name}
    return out


#: The targeting, signal, sampling and self-distillation keys issue 27 names, each of which must be
#: a registered choice.
ISSUE_KEYS = {
    "targeting.include_path_token",
    "targeting.candidates_per_node",
    "targeting.tau_gkd",
    "targeting.tau_gap",
    "targeting.per_window_gkd",
    "targeting.per_window_gap",
    "targeting.first_window",
    "targeting.growth",
    "targeting.visit_target",
    "targeting.max_rollouts_per_path",
    "temperature",
    "summary_temperature",
    "solution_temperature",
    "solution_tries",
    "summary_max_new_tokens",
    "thinking",
    "teachers[].thinking",
    "summarizer_thinking",
    "solution_thinking",
    "solution_thinking_shown",
    "rollouts_per_question",
    "max_new_tokens",
    "n_questions",
    "signals.restriction",
    "signals.min_visits",
    "signals.alignment_estimator",
    "tree_accounting",
    "stat_unit",
}


def test_every_result_key_is_one_registered_choice():
    from opdlens.diagnose.choices import CHOICES, CHOICES_BY_KEY, NOT_CHOICES, OURS, PAPER, run_choices
    from opdlens.diagnose.config import NON_RESULT_KEYS
    from opdlens.diagnose.signals import SignalConfig
    from opdlens.diagnose.targeting import TargetingConfig
    from opdlens.diagnose.teachers import TeacherSpec

    keys = [c.key for c in CHOICES]
    assert len(keys) == len(set(keys)) and len({c.label for c in CHOICES}) == len(CHOICES)
    assert _dotted(PAPER_PRESET) <= set(keys)  # every preset value is disclosed
    assert ISSUE_KEYS <= set(keys)
    # every config key is a choice, or declared not to be one: a new key cannot be forgotten
    nested = {"targeting": TargetingConfig, "signals": SignalConfig}
    every = set()
    for name in DiagnoseConfig.model_fields:
        if name in nested:
            every |= {f"{name}.{k}" for k in nested[name].model_fields}
        else:
            every.add(name)
    every |= {f"teachers[].{k}" for k in TeacherSpec.model_fields if k == "thinking"}
    unclassified = every - set(keys) - set(NOT_CHOICES) - set(NON_RESULT_KEYS) - {"protocol"}
    assert not unclassified, f"config keys neither in CHOICES nor in NOT_CHOICES: {sorted(unclassified)}"
    assert not (set(keys) & set(NOT_CHOICES)) and set(keys) <= every
    # the values come from the preset and the defaults, not from a copy of them
    paper, ours = DiagnoseConfig(protocol="paper"), DiagnoseConfig()
    for c in CHOICES:
        assert c.provenance in (PAPER, OURS) and c.source
        assert c.paper == c.value(paper) and c.ours == c.value(ours)
    assert (
        CHOICES_BY_KEY["targeting.per_window_gkd"].paper == 20 and CHOICES_BY_KEY["targeting.per_window_gkd"].ours == 4
    )
    assert CHOICES_BY_KEY["tree_accounting"].paper == "all-ancestors"
    assert CHOICES_BY_KEY["targeting.tau_gkd"].provenance == OURS  # the paper names τ without a value
    assert CHOICES_BY_KEY["targeting.visit_target"].provenance == PAPER
    # choices(): every registered label with this config's value, in order, after the protocol
    cfg = DiagnoseConfig.model_validate(
        {"protocol": "paper", "teachers": [{"name": "A", "context": "sum-1c", "thinking": False}], "temperature": 0.7}
    )
    ch = run_choices(cfg)
    assert list(ch) == ["protocol", *(c.label for c in CHOICES)]
    assert ch["student sampling temperature"] == 0.7 and ch["thinking (teachers)"] == {"A": False}
    assert ch["targets per window by GKD magnitude"] == 20 and ch["shown solution keeps its <think> part"] is True
    used = run_choices(cfg, used_only=True)  # no adaptive targeting, no 1C-ext teacher: those keys are left out
    assert "summary temperature" in used and "adaptive: rounds" not in used and "solution writer tries" not in used


def test_protocol_doc_lists_every_choice():
    from pathlib import Path

    from opdlens.diagnose.choices import CHOICES, choices_markdown

    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    table = doc.split("<!-- choices:begin -->\n", 1)[1].split("\n<!-- choices:end -->", 1)[0]
    assert table == choices_markdown(), (
        "docs/PROTOCOL.md's choices table differs from CHOICES: paste the output of "
        "`python -c 'from opdlens.diagnose.choices import choices_markdown; print(choices_markdown())'`"
    )
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == len(CHOICES)
    for c, row in zip(CHOICES, rows):
        assert f"| `{c.key}` |" in row and f"| {c.provenance}: " in row


def test_paper_configs_label_every_value():
    """Every key line of configs/paper-*.yaml says whether the paper states its value; the label of
    a registered choice is the registry's, and a value the preset also fills is the preset's."""
    import re
    from pathlib import Path

    import yaml

    from opdlens.diagnose.choices import CHOICES_BY_KEY, OURS, PAPER

    paper = DiagnoseConfig(protocol="paper")
    files = sorted(f for f in (Path(__file__).parent.parent / "configs").iterdir() if PAPER_A_CONFIG.fullmatch(f.name))
    assert len(files) == 6
    for f in files:
        section = ""
        for line in f.read_text(encoding="utf-8").splitlines():
            m = re.match(r"^(\s*)([a-z_]+):\s*([^#]*?)\s*(#\s*(.*))?$", line)
            if not m or line.lstrip().startswith(("#", "-")):
                continue
            indent, key, value, label = m.group(1), m.group(2), m.group(3), m.group(5)
            if not indent and value == "" and key in ("targeting", "signals"):
                section = key
                continue
            section = section if indent else ""
            dotted = f"{section}.{key}" if section else key
            assert label and label.startswith((PAPER + ":", PAPER + " ", OURS)), f"{f.name}: {dotted} is unlabelled"
            choice = CHOICES_BY_KEY.get(dotted)
            if choice is not None:
                assert label.startswith(choice.provenance), f"{f.name}: {dotted} labelled {label!r}"
                if not choice.per_setting:
                    assert choice.value(DiagnoseConfig.from_yaml(f)) == choice.value(paper), (f.name, dotted)
        raw = yaml.safe_load(f.read_text(encoding="utf-8"))
        assert raw["targeting"]["per_window_gkd"] == PAPER_PRESET["targeting"]["per_window_gkd"]


# --------------------------------------------------------------------------------------------
# the paper's budget: 45K-200K targeted rollouts per question (issue 27, item 2)
# --------------------------------------------------------------------------------------------

#: Trace lengths of the paper's tasks (BoolQ, MMLU, AIME) and the windows 1-50, 51-150, 151-350, ...
#: that cover them, by hand: ends 50, 150, 350, 750, 1550, 3150, 6350, 12750, 25550, 51150.
WINDOWS_BY_HAND = {200: 3, 1000: 5, 2000: 6, 30000: 10}


def _plan_total(length: int, on_path: bool, cfg) -> int:  # type: ignore[no-untyped-def]
    """Targeted rollouts TargetPlan gives one path of ``length`` tokens whose candidates are, at
    every node, only its own token (``on_path``: nothing to add) or only another token (every
    chosen node then gets its path token too), with random priorities above the thresholds and no
    visits yet."""
    import numpy as np

    from opdlens.diagnose.targeting import Candidates, TargetPlan
    from opdlens.diagnose.tree import RolloutSet, path_stats

    rng = np.random.default_rng(length)
    path = rng.integers(0, 50, size=length)
    node = np.arange(length)
    token = path if on_path else path + 100
    cands = Candidates(node, token.astype(np.int64), 0.5 + rng.random(length), 0.5 + rng.random(length))
    stats = path_stats(list(path), RolloutSet.from_lists([[999]], [True]))  # no visit of any candidate
    return TargetPlan(list(path), stats, cands, cfg).budget


def test_paper_budget_lands_in_the_papers_range():
    import re
    from pathlib import Path

    from opdlens.diagnose.config import PAPER_TARGETED_RANGE
    from opdlens.diagnose.targeting import depth_windows

    cfg = DiagnoseConfig(protocol="paper")
    t, paths = cfg.targeting, cfg.n_correct_paths + cfg.n_incorrect_paths
    lo_paper, hi_paper = PAPER_TARGETED_RANGE
    assert (lo_paper, hi_paper) == (45_000, 200_000) and paths == 4
    per_window = t.per_window_gkd + t.per_window_gap
    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    for length, w in WINDOWS_BY_HAND.items():
        assert len(depth_windows(length, t.first_window, t.growth)) == w
        low = w * per_window * t.visit_target * paths  # every chosen node's path token among its pairs
        high = min(w * 2 * per_window * t.visit_target, t.max_rollouts_per_path) * paths  # none is
        assert lo_paper <= low <= high <= hi_paper, (length, low, high)
        # the targeting code itself, at both ends
        assert _plan_total(length, True, t) * paths == low
        assert _plan_total(length, False, t) * paths == high
        # the arithmetic docs/PROTOCOL.md shows
        row = next(r for r in doc.splitlines() if r.startswith(f"| {length:,} | {w} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == str(per_window) and cells[3] == f"{low // paths:,}"
        assert cells[4] == f"{low:,}" and re.match(rf"{high:,}\b", cells[5])
    # the old preset (4 + 4) missed the range: the issue's 19K at 200 tokens, 38K at 2K
    assert 3 * 2 * 8 * 100 * 4 == 19_200 < lo_paper and 6 * 2 * 8 * 100 * 4 == 38_400 < lo_paper


# --------------------------------------------------------------------------------------------
# self-distillation contexts (issue 27, item 6)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shown", [True, False])
def test_solution_thinking_shown_is_a_choice(tmp_path, shown):
    from opdlens.diagnose.diagnosis import Diagnosis
    from opdlens.diagnose.questions import QuestionEnv
    from opdlens.diagnose.schedule import Teacher
    from opdlens.diagnose.teachers import TeacherSpec
    from opdlens.diagnose.tree import RolloutSet
    from opdlens.synthetic import SyntheticPolicy

    student = SyntheticPolicy.random(seed=0, horizon=4)
    specs = [TeacherSpec(name="Self-1C1W", context="1c1w"), TeacherSpec(name="Self-1C(ext)", context="1c-ext")]
    cfg = DiagnoseConfig(max_new_tokens=4, solution_thinking_shown=shown, out_dir=str(tmp_path))
    diag = Diagnosis(RunStore(tmp_path), student, [Teacher(s, student) for s in specs], cfg, progress=False)
    texts = {
        (1,): "<think>plan A</think> The answer is 4.",
        (2,): "<think>still going",  # unterminated: nothing after the thinking part
        (3,): "<think>plan C</think> 5",
        (4,): "<think>plan D</think> 6",
    }
    env = QuestionEnv(
        id="q",
        prompt_ids=[],
        grade=lambda t: True,
        decode=lambda toks: texts[tuple(int(x) for x in toks)],
        external_solution="<think>by the writer</think> 4",
    )
    initial = RolloutSet.from_lists([[1], [2], [3], [4]], [True, False, True, False])
    paths = pd.DataFrame({"question_id": "q", "path_id": [0, 1], "correct": [True, False], "tokens": [[3], [4]]})
    sol = diag.solutions(env, initial, paths)
    if shown:  # as written (the default: what the tool did before the key existed)
        assert sol.correct == texts[(1,)] and sol.wrong == texts[(2,)]
        assert sol.external == "<think>by the writer</think> 4"
    else:
        assert sol.correct == "The answer is 4." and sol.external == "4"
        assert sol.wrong is None and "thinking part" in sol.reasons["wrong"]  # a recorded reason, no substitute
    stored = RunStore(tmp_path).read_table("solutions/q.parquet").iloc[0]
    assert stored["correct"] == sol.correct  # what the teacher sees is what is stored
    assert DiagnoseConfig().solution_thinking_shown is True


def test_contexts_longer_than_the_window_are_counted_per_teacher(qwen3_dirs, tmp_path):
    """A teacher whose model's window cannot hold its context and a path is skipped on that
    question, with a recorded reason the report counts per teacher (its rendering: test_report)."""
    import shutil

    from transformers import AutoConfig

    from opdlens.report.tables import skip_counts

    short = tmp_path / "short"
    shutil.copytree(qwen3_dirs["teacher"], short)
    conf = AutoConfig.from_pretrained(short)
    conf.max_position_embeddings = 8  # the chat-encoded prompt alone is longer
    conf.save_pretrained(short)
    cfg = _config(
        qwen3_dirs,
        tmp_path / "run",
        teachers=[{"name": "Self-1C", "context": "1c"}, {"name": "Short", "model": str(short)}],
        summarizer=None,
        solution_model=None,
        fallback_reference_solution=True,
    )
    diag, envs = build_diagnosis(cfg, progress=False)
    skips = pd.DataFrame([row for env in envs for row in diag.prepare(env).skips])
    assert not diag.teachers[1].slot.loaded  # the window is known from the model's config alone
    too_long = skips[(skips.teacher == "Short") & skips.reason.str.contains("exceeds the teacher's context of 8")]
    assert len(too_long) == len(envs) == 2
    counts = skip_counts(skips, ["Self-1C", "Short"]).set_index("teacher")
    assert counts.loc["Short", "too_long"] == counts.loc["Short", "skipped"] == 2
    assert counts.loc["Self-1C", "too_long"] == 0
