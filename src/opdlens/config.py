"""Run configurations (pydantic), loadable from YAML with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from opdlens.policy import OpdlensError
from opdlens.signals import SignalConfig
from opdlens.targeting import TargetingConfig
from opdlens.teachers import DEFAULT_TEACHERS, TeacherSpec


#: ``protocol: paper``: the choices of paper A (PAPERS.md) where opdlens' defaults differ, applied
#: to every key the config does not set itself. docs/PROTOCOL.md says why each default differs.
PAPER_PRESET: dict[str, Any] = {
    "signals": {"restriction": "literal", "min_visits": 20, "min_children": 2},
    "tree_accounting": "all-ancestors",
    "stat_unit": "question",
    "n_correct_paths": 2,
    "n_incorrect_paths": 2,
    "targeting": {"first_window": 50, "growth": 2.0, "per_window_gkd": 4, "per_window_gap": 4, "visit_target": 100},
    "fallback_reference_solution": False,
}


def _apply_preset(data: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every key of ``preset`` that it does not set (nested one level)."""
    out = dict(data)
    for key, value in preset.items():
        if isinstance(value, dict) and isinstance(out.get(key, {}), dict):
            out[key] = {**value, **out.get(key, {})}
        elif key not in out:
            out[key] = value
    return out


class DiagnoseConfig(BaseModel):
    """Everything a ``opdlens diagnose`` run needs. Unknown keys are errors (typos)."""

    model_config = ConfigDict(extra="forbid")

    protocol: Literal["opdlens", "paper"] = Field(
        "opdlens",
        description="'paper' fills every key you do not set with paper A's choice (PAPER_PRESET); "
        "'opdlens' keeps our defaults (docs/PROTOCOL.md lists the differences and why)",
    )
    student: str = Field("smollm2", description="'smollm2' (embedded), a local path or a HF hub id")
    thinking: bool | None = Field(
        None, description="enable_thinking of the student's chat template (Qwen3); null = the template's default"
    )
    device: str = "cpu"
    dtype: str | None = None
    rollout_engine: Literal["torch", "vllm"] = Field(
        "torch", description="student sampler: opdlens' TorchEngine, or vLLM (CUDA, pip install 'opdlens[vllm]')")
    vllm_options: dict[str, Any] = Field(default_factory=dict, description="passed to vllm.LLM, e.g. gpu_memory_utilization")
    task: str = "arith"
    task_args: dict[str, Any] = Field(default_factory=dict, description="passed to the task, e.g. path= for jsonl")
    split: str = "test"
    n_questions: int | None = Field(4, ge=1)
    rollouts_per_question: int = Field(64, ge=2)
    max_new_tokens: int | None = Field(None, ge=1, description="default: the task's own budget")
    temperature: float = Field(1.0, gt=0)
    n_correct_paths: int = Field(2, ge=0)
    n_incorrect_paths: int = Field(2, ge=0)
    chunk_rollouts: int = Field(256, ge=1)
    seed: int = 0
    teachers: list[TeacherSpec] = Field(default_factory=lambda: list(DEFAULT_TEACHERS))
    targeting_teachers: list[str] | None = None
    summarizer: str | None = Field(None, description="model writing Sum-* summaries (default: the student)")
    summarizer_thinking: bool | None = Field(
        None, description="enable_thinking of the summariser (its thinking part is stripped from the summary either way)"
    )
    summary_max_new_tokens: int = Field(256, ge=1, description="generation budget of a summary (thinking included)")
    solution_model: str | None = Field(None, description="model writing the correct solution of 1c-ext contexts")
    solution_thinking: bool | None = Field(None, description="enable_thinking of the solution model")
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
        "(fits large teachers on one GPU); 'resident': every model loaded for the whole run",
    )
    targeting: TargetingConfig = Field(default_factory=TargetingConfig)
    signals: SignalConfig = Field(default_factory=SignalConfig)
    out_dir: str = "runs/diagnose"

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("protocol") == "paper":
            return _apply_preset(data, PAPER_PRESET)
        return data

    def choices(self) -> dict[str, Any]:
        """The choices that make a run paper-faithful or not, for the report."""
        return {
            "protocol": self.protocol,
            "restriction to S_u": self.signals.restriction,
            "tree accounting": self.tree_accounting,
            "statistical unit": self.stat_unit,
            "min visits per child": self.signals.min_visits,
            "visit target": self.targeting.visit_target,
            "reference-solution fallback": self.fallback_reference_solution,
            "thinking (student)": self.thinking,
            "thinking (summariser)": self.summarizer_thinking,
            "thinking (solution model)": self.solution_thinking,
            "thinking (teachers)": {t.name: t.thinking for t in self.teachers if t.thinking is not None} or None,
            "schedule": self.schedule,
        }

    @classmethod
    def from_yaml(cls, path: str | Path) -> DiagnoseConfig:
        return load_yaml(cls, path)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; errors name the file, the line and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise OpdlensError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise OpdlensError(f"config {p} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise OpdlensError(f"config {p} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def validate_config(cls: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """``cls.model_validate(data)`` with pydantic's errors rewritten as one readable message."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(x) for x in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        ]
        raise OpdlensError(f"config {where} has {len(lines)} problem(s):\n" + "\n".join(lines)) from None


def load_yaml(cls: type[BaseModel], path: str | Path) -> Any:
    """Parse and validate a YAML config file into ``cls``."""
    return validate_config(cls, read_yaml(path), str(path))


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
