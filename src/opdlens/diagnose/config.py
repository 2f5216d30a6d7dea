"""The ``opdlens diagnose`` run configuration (:class:`DiagnoseConfig`), its ``protocol: paper``
preset, the demo's configuration and the reader of a stored run's configuration."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from opdlens.config import RunSettings, load_yaml, read_yaml, validate_config, with_legacy_values
from opdlens.diagnose.signals import SignalConfig
from opdlens.diagnose.targeting import TargetingConfig
from opdlens.diagnose.teachers import DEFAULT_TEACHERS, TeacherSpec, needed_texts
from opdlens.rollout.base import TEMPERATURE_RANGE, EngineConfig

#: Keys of a :class:`DiagnoseConfig` that do not change what a run estimates: where it runs and
#: how fast (device, dtype, sampler engine and its options) and where it writes. Every other key
#: (model ids, task and its arguments, budgets, seed, teachers, targeting, signal thresholds,
#: chunk size, which fixes the chunk seeds) is part of the run's fingerprint: a run directory
#: resumes only under the same values. Changing an excluded key on resume is allowed; the
#: rollouts then come from a different random stream or precision than the stored ones.
#: ``schedule`` is one of the former (with several questions the sequential schedule samples the
#: targeted rollouts of all questions together, the resident one each question alone: other random
#: streams, the same distributions); ``stat_unit`` (the report only) changes no stored result.
NON_RESULT_KEYS = frozenset({"device", "dtype", "rollout_engine", "vllm_options", "out_dir", "schedule", "stat_unit"})

#: The devices a run can name (``device``): the CPU, a CUDA GPU (``cuda``, ``cuda:1``) or Apple's ``mps``.
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?|mps")

#: Values that keys added (or whose defaults changed) after a run was written had in that run:
#: a stored configuration without the key ran with this value, not with today's default.
LEGACY_VALUES: dict[tuple[str, str], Any] = {
    ("signals", "alignment_estimator"): "plugin",  # the default until posterior_mean became ours
    ("targeting", "scope"): "pairs",  # adaptive rounds spent on the chosen pairs only
}


#: ``protocol: paper``: the choices of paper A (PAPERS.md) where opdlens' defaults differ, applied
#: to every key the config does not set itself. :data:`CHOICES` says, key by key, which of these
#: values paper A's text states and which are ours where it is silent (docs/PROTOCOL.md).
#: The targeting budget: the paper's "45K–200K targeted rollouts per question depending on trace
#: length" with its windows (50·2^i) and ~100 visits per target gives 20 + 20 targets per window
#: (4 paths: 48K at 200 tokens, 160K at 30K; docs/PROTOCOL.md, "Budget"); the per-path cap of
#: 200K / 4 keeps a question at or below the paper's upper bound when the path's own tokens at the
#: chosen nodes (``include_path_token``) add up to as many targets again.
PAPER_PRESET: dict[str, Any] = {
    "signals": {"restriction": "literal", "min_visits": 20, "min_children": 2, "alignment_estimator": "plugin"},
    "tree_accounting": "all-ancestors",
    "stat_unit": "question",
    "n_correct_paths": 2,
    "n_incorrect_paths": 2,
    "targeting": {
        "first_window": 50,
        "growth": 2.0,
        "per_window_gkd": 20,
        "per_window_gap": 20,
        "visit_target": 100,
        "max_rollouts_per_path": 50_000,
    },
    "fallback_reference_solution": False,
}

#: The paper's stated range of targeted rollouts per question (paper A, §2.5 / §3).
PAPER_TARGETED_RANGE: tuple[int, int] = (45_000, 200_000)


def _apply_preset(data: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every key of ``preset`` that it does not set (nested one level)."""
    out = dict(data)
    for key, value in preset.items():
        if isinstance(value, dict) and isinstance(out.get(key, {}), dict):
            out[key] = {**value, **out.get(key, {})}
        elif key not in out:
            out[key] = value
    return out


class DiagnoseConfig(RunSettings):
    """Everything a ``opdlens diagnose`` run needs. Unknown keys are errors (typos)."""

    model_config = ConfigDict(extra="forbid")

    NON_RESULT_KEYS: ClassVar[frozenset[str]] = NON_RESULT_KEYS
    LEGACY_VALUES: ClassVar[dict[tuple[str, str], Any]] = LEGACY_VALUES

    protocol: Literal["opdlens", "paper"] = Field(
        "opdlens",
        description="'paper' fills every key you do not set with paper A's choice (PAPER_PRESET); "
        "'opdlens' keeps our defaults (docs/PROTOCOL.md lists the differences and why)",
    )
    thinking: bool | None = Field(
        None, description="enable_thinking of the student's chat template (Qwen3); null = the template's default"
    )
    device: str = Field("cpu", description="torch device of the models: cpu, cuda, cuda:1, ...")
    dtype: str | None = Field(
        None, description="model dtype (float32, bfloat16, ...); default float32 on CPU, bfloat16 on CUDA"
    )
    rollout_engine: Literal["torch", "vllm"] = Field(
        "torch", description="student sampler: opdlens' TorchEngine, or vLLM (CUDA, pip install 'opdlens[vllm]')"
    )
    vllm_options: dict[str, Any] = Field(
        default_factory=dict, description="passed to vllm.LLM, e.g. gpu_memory_utilization"
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="settings of the torch rollout engine (batch rows, kernels, sampler, CUDA graphs, compaction)",
    )
    split: str = Field("test", description="dataset split the questions come from")
    n_questions: int | None = Field(4, ge=1, description="questions drawn (seeded) from the split; None = all")
    rollouts_per_question: int = Field(64, ge=2, description="initial student rollouts per question")
    n_correct_paths: int = Field(2, ge=0, description="correct representative paths per question")
    n_incorrect_paths: int = Field(2, ge=0, description="incorrect representative paths per question")
    chunk_rollouts: int = Field(256, ge=1, description="rollouts per stored chunk (the unit of resumption)")
    teachers: list[TeacherSpec] = Field(
        default_factory=lambda: list(DEFAULT_TEACHERS), min_length=1, description="teacher configurations scored"
    )
    targeting_teachers: list[str] | None = Field(
        None, description="names of the teachers whose log-probs choose the targeted rollouts; None = all"
    )
    summarizer: str | None = Field(None, description="model writing Sum-* summaries (default: the student)")
    summarizer_thinking: bool | None = Field(
        None,
        description="enable_thinking of the summariser (its thinking part is stripped from the summary either way)",
    )
    summary_max_new_tokens: int = Field(256, ge=1, description="generation budget of a summary (thinking included)")
    summary_temperature: float = Field(0.3, gt=0, description="sampling temperature of a summary (ours; paper silent)")
    solution_model: str | None = Field(None, description="model writing the correct solution of 1c-ext contexts")
    solution_thinking: bool | None = Field(None, description="enable_thinking of the solution model")
    solution_temperature: float = Field(
        0.7, gt=0, description="sampling temperature of the solution model (ours; paper silent)"
    )
    solution_tries: int = Field(
        8, ge=1, description="samples of the solution model per question; the first correct one is shown (ours)"
    )
    solution_thinking_shown: bool = Field(
        True,
        description="whether a solution shown to a self-distillation teacher (a correct or wrong rollout, the "
        "external solution) keeps its <think>...</think> part; false shows only the text after it (ours; paper "
        "silent). Summaries are stripped of the summariser's own thinking either way",
    )
    fallback_reference_solution: bool = Field(
        False,
        description="when no correct rollout can be shown (none, or only scored paths), show the data's reference "
        "solution ('The answer is X.' if none) instead of skipping the context; recorded in skips.parquet",
    )
    tree_accounting: Literal["from-forced-node", "all-ancestors"] = Field(
        "from-forced-node",
        description="where a targeted rollout counts: from its forced node down (unbiased), or at every "
        "ancestor too (the paper)",
    )
    stat_unit: Literal["path", "question"] = Field(
        "path", description="unit of the report's CIs and teacher tests: path means, or question means (the paper)"
    )
    schedule: Literal["sequential", "resident"] = Field(
        "sequential",
        description="'sequential': each model loaded once, used for every question and freed after its step "
        "(fits large teachers on one GPU), targeted rollouts of all questions sampled together; 'resident': every "
        "model loaded for the whole run, questions one at a time (as the Ray workers run them)",
    )
    targeting: TargetingConfig = Field(default_factory=TargetingConfig)
    signals: SignalConfig = Field(default_factory=SignalConfig)
    out_dir: str = Field("runs/diagnose", min_length=1, description="run directory (rerun to resume)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_PATTERN.fullmatch(v):
            raise ValueError(f"{v!r} is not a device opdlens runs on: use 'cpu', 'cuda', 'cuda:<index>' or 'mps'")
        return v

    @model_validator(mode="after")
    def _check(self) -> DiagnoseConfig:
        names = [t.name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teacher names must be unique, repeated: {dup}")
        unknown = sorted(set(self.targeting_teachers or []) - set(names))
        if unknown:
            raise ValueError(f"targeting_teachers {unknown} are not teacher names; the teachers are {names}")
        if self.n_correct_paths + self.n_incorrect_paths == 0:
            raise ValueError("n_correct_paths + n_incorrect_paths is 0: no path would be scored; set one to >= 1")
        return self

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("protocol") == "paper":
            return _apply_preset(data, PAPER_PRESET)
        return data

    @property
    def count_forced_at_ancestors(self) -> bool:
        """The paper's tree accounting (:func:`opdlens.diagnose.tree.path_stats`)."""
        return self.tree_accounting == "all-ancestors"

    def choices(self, used_only: bool = False) -> dict[str, Any]:
        """The run's value of every result-changing choice (:data:`CHOICES`), by label, after
        ``protocol``; ``used_only`` leaves out the keys this run does not use (adaptive-mode keys
        under fixed targeting, summariser keys without a Sum-* teacher, ...)."""
        return {
            "protocol": self.protocol,
            **{c.label: c.value(self) for c in CHOICES if not used_only or c.used_by(self)},
        }

    @model_validator(mode="after")
    def _vllm_temperature(self) -> DiagnoseConfig:
        lo, hi = TEMPERATURE_RANGE
        if self.rollout_engine == "vllm" and not lo <= self.temperature <= hi:
            raise ValueError(
                f"temperature must be in [{lo}, {hi}] with rollout_engine: vllm "
                f"(vLLM rejects higher ones and raises lower ones to {lo}), got {self.temperature}"
            )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> DiagnoseConfig:
        return load_yaml(cls, path)


# ---------------------------------------------------------------------- the run's choices
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
#: ``DiagnoseConfig.choices()``, the report's "Choices of this run" and the PROTOCOL.md table all
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
    Choice("temperature", "student sampling temperature", OURS, "not stated (nor top-p / top-k)"),
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


def read_run_config(path: str | Path) -> DiagnoseConfig:
    """The configuration a run directory's ``config.yaml`` was written with (see :func:`with_legacy_values`)."""
    return validate_config(DiagnoseConfig, with_legacy_values(read_yaml(path), LEGACY_VALUES), str(path))


def demo_config(out_dir: str = "runs/demo", n_questions: int = 4) -> DiagnoseConfig:
    """The laptop-CPU demo: embedded SmolLM2, built-in arithmetic, three self-distillation contexts."""
    return DiagnoseConfig(
        student="smollm2",
        task="arith",
        n_questions=n_questions,
        rollouts_per_question=24,
        max_new_tokens=24,
        teachers=list(DEFAULT_TEACHERS),
        targeting=TargetingConfig(
            first_window=6, per_window_gkd=2, per_window_gap=2, visit_target=8, max_rollouts_per_path=48
        ),
        signals=SignalConfig(min_visits=5),
        # SmolLM2 solves few arith questions: show the reference answer when it has no usable
        # correct rollout (each such question is listed in skips.parquet as a fallback)
        fallback_reference_solution=True,
        out_dir=out_dir,
    )
