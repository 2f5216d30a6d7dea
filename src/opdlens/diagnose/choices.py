"""Every result-changing choice of a ``opdlens diagnose`` run, in one list (:data:`CHOICES`): its
config key, its value under ``protocol: paper`` and under our defaults (computed from
:data:`~opdlens.diagnose.config.PAPER_PRESET` and the defaults, so they cannot drift), and whether
paper A's text states the paper value. ``run_choices(config)``, the report's "Choices of this
run" and docs/PROTOCOL.md's table all come from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.teachers import needed_texts

#: Provenance of a choice's ``protocol: paper`` value: paper A's text states it, or it does not
#: and the value is ours.
PAPER = "paper"
OURS = "ours (paper silent)"


def _uses_adaptive(cfg: DiagnoseConfig) -> bool:
    return cfg.targeting.mode == "adaptive"


def _needs(*texts: str) -> Callable[[DiagnoseConfig], bool]:
    """Used when a teacher's context needs one of ``texts`` (:func:`~opdlens.diagnose.teachers.needed_texts`)."""

    def used(cfg: DiagnoseConfig) -> bool:
        return bool(needed_texts([t.context for t in cfg.teachers]) & set(texts))

    return used


@dataclass(frozen=True)
class Choice:
    """One result-changing choice of a run: a config key, its value under ``protocol: paper`` and
    under our defaults (both computed from :data:`PAPER_PRESET` and the config's defaults, so they
    cannot drift), and whether paper A's text states the paper value (``provenance`` :data:`PAPER`,
    ``source`` says what the text says) or not (:data:`OURS`, ``source`` says what the value is).

    ``per_setting``: the preset leaves the key at our default and ``configs/paper-*.yaml`` set it
    per setting (models, sizes, budgets); ``used``: whether a run uses the key at all (None: always)."""

    key: str  # dotted config key; "teachers[].thinking" is each teacher's own switch
    label: str
    provenance: str
    source: str
    per_setting: bool = False
    used: Callable[[DiagnoseConfig], bool] | None = None

    def value(self, cfg: DiagnoseConfig) -> Any:
        """The value of this key in ``cfg``."""
        if self.key == "teachers[].thinking":
            return {t.name: t.thinking for t in cfg.teachers if t.thinking is not None} or None
        cur: Any = cfg
        for part in self.key.split("."):
            cur = getattr(cur, part)
        return cur

    @property
    def paper(self) -> Any:
        """The value under ``protocol: paper`` with the key unset."""
        return self.value(DiagnoseConfig(protocol="paper"))

    @property
    def ours(self) -> Any:
        """Our default (``protocol: opdlens``)."""
        return self.value(DiagnoseConfig())

    def used_by(self, cfg: DiagnoseConfig) -> bool:
        return self.used is None or self.used(cfg)


_SUMMARY = _needs("correct_summary", "wrong_summary")
_EXTERNAL = _needs("external")
_SHOWN = _needs("correct", "wrong", "external")

#: Every result-changing choice of a run, in the order the report and docs/PROTOCOL.md list them.
#: ``run_choices(config)``, the report's "Choices of this run" and the PROTOCOL.md table all
#: come from this list; tests/test_protocol.py checks that every key of :data:`PAPER_PRESET` and
#: every config key not in :data:`NOT_CHOICES` / :data:`NON_RESULT_KEYS` is here.
CHOICES: tuple[Choice, ...] = (
    # -- signals at a node
    Choice(
        "signals.restriction",
        "restriction to S_u",
        PAPER,
        'both gradients "restricted to S_u"; the literal reading keeps their full-vocabulary components on S_u '
        "(P̄ the student's expected success at u, ℓ̄ the full-vocabulary KL); the reading is ours",
    ),
    Choice(
        "signals.min_visits",
        "min visits per child",
        PAPER,
        ">= 20 visits per child on short tasks, >= 10 on AIME",
        True,
    ),
    Choice("signals.min_children", "min children in S_u", PAPER, "a node needs >= 2 well-visited children"),
    Choice("signals.min_psucc_range", "min P_succ range", PAPER, "a non-zero range of P_succ over S_u (range > 0)"),
    Choice(
        "signals.alignment_estimator",
        "alignment estimator",
        PAPER,
        "Align(u) = cos(g_ideal, g_D) at the observed P_succ (the plug-in)",
    ),
    Choice("signals.minillm_gamma", "MiniLLM discount", OURS, "discount of MiniLLM's reward-to-go"),
    Choice("signals.minillm_length_norm", "MiniLLM length normalisation", OURS, "reward-to-go divided by its terms"),
    # -- the tree
    Choice(
        "tree_accounting",
        "tree accounting",
        PAPER,
        'a targeted rollout "enriches not only the target node but all ancestors and descendants"',
    ),
    Choice("n_correct_paths", "correct paths per question", PAPER, "4 representative paths: 2 correct, 2 incorrect"),
    Choice(
        "n_incorrect_paths", "incorrect paths per question", PAPER, "4 representative paths: 2 correct, 2 incorrect"
    ),
    # -- targeted rollouts
    Choice("targeting.mode", "targeting mode", PAPER, "every target enriched to ~100 visits (fixed)"),
    Choice("targeting.first_window", "first depth window", PAPER, "windows of tokens 1-50, 51-150, 151-350, ..."),
    Choice("targeting.growth", "window growth", PAPER, "windows of tokens 1-50, 51-150, 151-350, ..."),
    Choice(
        "targeting.per_window_gkd",
        "targets per window by GKD magnitude",
        OURS,
        "a fixed per-window budget, number not stated; 20 + 20 meet the paper's 45K-200K targeted rollouts per "
        "question (docs/PROTOCOL.md, Budget)",
    ),
    Choice(
        "targeting.per_window_gap",
        "targets per window by probability gap",
        OURS,
        "a fixed per-window budget, number not stated; 20 + 20 meet the paper's 45K-200K targeted rollouts per "
        "question (docs/PROTOCOL.md, Budget)",
    ),
    Choice(
        "targeting.tau_gkd", "threshold τ on the GKD magnitude", OURS, "the paper names thresholds τ without values"
    ),
    Choice(
        "targeting.tau_gap", "threshold τ on the probability gap", OURS, "the paper names thresholds τ without values"
    ),
    Choice("targeting.visit_target", "visits per target", PAPER, "each target enriched to ~100 visits"),
    Choice(
        "targeting.candidates_per_node",
        "candidate tokens per node (top-k)",
        OURS,
        "the student's and each teacher's top-k tokens are the candidates; the paper does not say which tokens",
    ),
    Choice(
        "targeting.include_path_token",
        "path token enriched at chosen nodes",
        OURS,
        "the path's own token at every chosen node, so the node gets >= 2 well-visited children",
    ),
    Choice(
        "targeting.max_rollouts_per_path",
        "targeted rollouts cap per path",
        OURS,
        "the paper states 45K-200K per question, no cap; paper preset: 200K / 4 paths",
    ),
    Choice(
        "targeting_teachers",
        "teachers choosing the targets",
        OURS,
        "null: every teacher, a target's priority its maximum over them; the paper does not say which teacher ranks",
    ),
    Choice("targeting.scope", "adaptive: candidates", OURS, "the paper has no adaptive mode", used=_uses_adaptive),
    Choice("targeting.rounds", "adaptive: rounds", OURS, "the paper has no adaptive mode", used=_uses_adaptive),
    Choice(
        "targeting.stop_halfwidth",
        "adaptive: stop half-width",
        OURS,
        "the paper has no adaptive mode",
        used=_uses_adaptive,
    ),
    Choice(
        "targeting.stop_on_sign", "adaptive: stop on sign", OURS, "the paper has no adaptive mode", used=_uses_adaptive
    ),
    Choice("targeting.level", "adaptive: interval level", OURS, "the paper has no adaptive mode", used=_uses_adaptive),
    Choice(
        "targeting.n_draws", "adaptive: posterior draws", OURS, "the paper has no adaptive mode", used=_uses_adaptive
    ),
    # -- sampling and the questions
    Choice("temperature", "student sampling temperature", OURS, "not stated"),
    Choice("top_p", "student sampling top-p", OURS, "not stated (1: off)"),
    Choice("top_k", "student sampling top-k", OURS, "not stated (0: off)"),
    Choice("min_p", "student sampling min-p", OURS, "not stated (0: off)"),
    Choice(
        "signals.student_distribution",
        "P_θ of the gradients",
        OURS,
        "P_θ is 'the student's probability'; sampling settings are not stated. 'sampling': the distribution the "
        "tree was sampled from (temperature and truncation); the same as the model's at T = 1 without truncation",
    ),
    Choice("n_questions", "questions per setting", OURS, "not stated", True),
    Choice("split", "dataset split", OURS, "not stated"),
    Choice("rollouts_per_question", "initial rollouts per question", OURS, "not stated", True),
    Choice("max_new_tokens", "generation budget (tokens)", OURS, "not stated (AIME traces run 5K-30K tokens)", True),
    Choice("thinking", "thinking (student)", OURS, "not stated; null = the chat template's default (Qwen3: on)", True),
    Choice("teachers[].thinking", "thinking (teachers)", OURS, "not stated; null = the student's setting"),
    # -- self-distillation contexts
    Choice(
        "solution_thinking_shown",
        "shown solution keeps its <think> part",
        OURS,
        "not stated: the correct / wrong / external solution is shown as written (true) or after </think> (false)",
        used=_SHOWN,
    ),
    Choice(
        "fallback_reference_solution",
        "reference-solution fallback",
        OURS,
        "not stated; the paper preset skips (recorded) a context without a usable correct rollout",
        used=_SHOWN,
    ),
    Choice(
        "summarizer",
        "summariser (Sum-* contexts)",
        PAPER,
        "the solution is summarised by a 32B model; which one (configs: Qwen/Qwen3-32B) is ours",
        True,
        _SUMMARY,
    ),
    Choice("summarizer_thinking", "thinking (summariser)", OURS, "not stated", True, _SUMMARY),
    Choice("summary_max_new_tokens", "summary budget (tokens)", OURS, "not stated", used=_SUMMARY),
    Choice("summary_temperature", "summary temperature", OURS, "not stated", used=_SUMMARY),
    Choice(
        "solution_model",
        "solution writer (1C-ext contexts)",
        PAPER,
        "the correct solution is written by a 32B model; which one (configs: Qwen/Qwen3-32B) is ours",
        True,
        _EXTERNAL,
    ),
    Choice("solution_thinking", "thinking (solution writer)", OURS, "not stated", True, _EXTERNAL),
    Choice("solution_temperature", "solution writer temperature", OURS, "not stated", used=_EXTERNAL),
    Choice(
        "solution_tries", "solution writer tries", OURS, "not stated; the first correct one is shown", used=_EXTERNAL
    ),
    # -- statistics and the schedule
    Choice("stat_unit", "statistical unit", PAPER, "CIs and tests over questions"),
    Choice(
        "schedule",
        "schedule",
        OURS,
        "which samples are drawn with several questions (the same distributions); not in the paper",
    ),
)
CHOICES_BY_KEY: dict[str, Choice] = {c.key: c for c in CHOICES}
CHOICES_BY_LABEL: dict[str, Choice] = {c.label: c for c in CHOICES}

#: Config keys that are not choices of the method, and why: what a run studies (its setting), and
#: its random streams (which samples, not their distribution). With :data:`NON_RESULT_KEYS` (where
#: and how fast it runs) and ``protocol`` they make up, with :data:`CHOICES`, every config key.
NOT_CHOICES: dict[str, str] = {
    "student": "the setting: the model studied",
    "task": "the setting: the task studied",
    "task_args": "the setting: the task's data",
    "teachers": "the setting: the teacher configurations studied (their thinking switch is a choice)",
    "seed": "the random stream",
    "chunk_rollouts": "the random stream (chunk seeds)",
    "engine": "the sampler's speed settings and random stream, not its distribution",
}


def _value_text(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def choices_markdown() -> str:
    """The table of :data:`CHOICES` that docs/PROTOCOL.md holds (tests/test_protocol.py checks it)."""
    head = "| choice | config key | `protocol: paper` | opdlens default | the paper's value is |\n|---|---|---|---|---|"
    rows = []
    for c in CHOICES:
        paper = _value_text(c.paper) + (" (per setting: configs/paper-*.yaml)" if c.per_setting else "")
        rows.append(f"| {c.label} | `{c.key}` | {paper} | {_value_text(c.ours)} | {c.provenance}: {c.source} |")
    return "\n".join([head, *rows])


def run_choices(cfg: DiagnoseConfig, used_only: bool = False) -> dict[str, Any]:
    """The run's value of every result-changing choice (:data:`CHOICES`), by label, after
    ``protocol``; ``used_only`` leaves out the keys this run does not use (adaptive-mode keys
    under fixed targeting, summariser keys without a Sum-* teacher, ...)."""
    return {"protocol": cfg.protocol, **{c.label: c.value(cfg) for c in CHOICES if not used_only or c.used_by(cfg)}}
