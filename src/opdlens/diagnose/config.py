"""The ``opdlens diagnose`` run configuration (:class:`DiagnoseConfig`), its ``protocol: paper``
preset, the demo's configuration and the reader of a stored run's configuration."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from opdlens.config import RunSettings, load_yaml, read_yaml, set_overrides, stored_overrides, validate_config
from opdlens.diagnose.signals import SignalConfig
from opdlens.diagnose.targeting import TargetingConfig
from opdlens.diagnose.teachers import DEFAULT_TEACHERS, TeacherSpec
from opdlens.identity import with_legacy_values
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
    ("", "top_p"): 1.0,  # sampling truncation came later: runs before it sampled the full distribution
    ("", "top_k"): 0,
    ("", "min_p"): 0.0,
    ("signals", "student_distribution"): "model",  # P_θ was the model's softmax at T = 1
}


#: ``protocol: paper``: the choices of paper A (PAPERS.md) where opdlens' defaults differ, applied
#: to every key the config does not set itself. :data:`opdlens.diagnose.choices.CHOICES` says, key by key, which of these
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
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> DiagnoseConfig:
        """The config of a YAML file with command-line ``overrides`` (``KEY=VALUE``,
        :func:`opdlens.config.apply_overrides`) applied before validation."""
        return load_yaml(cls, path, overrides)


def read_run_config(path: str | Path) -> DiagnoseConfig:
    """The configuration a run directory's ``config.yaml`` was written with (see :func:`with_legacy_values`),
    with the command-line overrides it records (:func:`opdlens.config.stored_overrides`)."""
    config = validate_config(DiagnoseConfig, with_legacy_values(read_yaml(path), LEGACY_VALUES), str(path))
    return set_overrides(config, stored_overrides(path))


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
