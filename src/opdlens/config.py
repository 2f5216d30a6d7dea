"""Run configurations (pydantic), loadable from YAML with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opdlens.policy import OpdlensError
from opdlens.rollout.base import EngineConfig
from opdlens.signals import SignalConfig
from opdlens.targeting import TargetingConfig
from opdlens.teachers import DEFAULT_TEACHERS, TeacherSpec


class DiagnoseConfig(BaseModel):
    """Everything a ``opdlens diagnose`` run needs. Unknown keys are errors (typos)."""

    model_config = ConfigDict(extra="forbid")

    student: str = Field("smollm2", description="'smollm2' (embedded), a local path or a HF hub id")
    device: str = "cpu"
    dtype: str | None = None
    rollout_engine: Literal["torch", "vllm"] = Field(
        "torch", description="student sampler: opdlens' TorchEngine, or vLLM (CUDA, pip install 'opdlens[vllm]')")
    vllm_options: dict[str, Any] = Field(default_factory=dict, description="passed to vllm.LLM, e.g. gpu_memory_utilization")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="settings of the torch rollout engine "
                                 "(batch rows, kernels, sampler, CUDA graphs, compaction)")
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
    solution_model: str | None = Field(None, description="model writing the correct solution of 1c-ext contexts")
    targeting: TargetingConfig = Field(default_factory=TargetingConfig)
    signals: SignalConfig = Field(default_factory=SignalConfig)
    out_dir: str = "runs/diagnose"

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
        out_dir=out_dir,
    )
