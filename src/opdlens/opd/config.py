"""The OPD run configuration (:class:`TrainConfig`) and the named prompt templates.

Every field carries its description; ``opdlens train CONFIG.yaml`` reads this model (unknown
keys are errors). The knobs of the authors' top-k OPD carry their meaning (``k``, ``topk_set``,
``topk_weight``, ``teacher_temperature``, rollout ``temperature``); docs/OPD.md maps them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import ConfigDict, Field, field_validator, model_validator

from opdlens.config import RunSettings
from opdlens.diagnose.teachers import get_context, trainable_contexts
from opdlens.errors import OpdlensError
from opdlens.opd.presets import PRESETS, preset_values
from opdlens.opd.registry import LOSSES, LossOptions, get_loss
from opdlens.opd.stages import ColdStartStage, DuplicatePromptStage, TeacherPromptStage, TemplateStage

#: Named prompt templates (``{prompt}``: the task prompt; ``{answer}``: the reference answer).
TEMPLATES: dict[str, str] = {
    "same": "{prompt}",
    "answer_hint": "{prompt}\n\n(Hint for you: the correct final answer is {answer}. "
    "Write a short solution that arrives at it.)",
    "step_by_step": "{prompt}\nThink step by step, then give the final answer.",
}


def resolve_template(template: str) -> str:
    """A template name of :data:`TEMPLATES` or a literal template containing ``{prompt}``."""
    tpl = TEMPLATES.get(template, template)
    if "{prompt}" not in tpl:
        raise OpdlensError(
            f"template {template!r} is neither a known name ({', '.join(TEMPLATES)}) nor a format "
            "string containing {prompt}"
        )
    try:
        tpl.format(prompt="x", answer="y")
    except (KeyError, IndexError, ValueError) as e:
        raise OpdlensError(
            f"template {template!r} has an unknown field or bad braces ({e}); allowed fields: {{prompt}}, {{answer}}"
        ) from e
    return tpl


#: Keys of a :class:`TrainConfig` that do not change what a training run computes, so a run may
#: resume under other values (every other key is in its fingerprint, ``out_dir/fingerprint.json``):
#:
#: * ``out_dir``: where it writes;
#: * ``device``, ``teacher_device``: where it runs (float32 master weights everywhere; other
#:   hardware rounds differently and draws from another generator, same distributions);
#: * ``progress``, ``tensorboard``, ``report_to``, ``project``, ``run_name``: display and extra
#:   copies of the log (metrics.jsonl is written either way);
#: * ``save_every``, ``keep_checkpoints``: when checkpoints are written and how many are kept
#:   (writing one draws no randomness; each step's randomness is a function of (seed, step));
#: * ``eval_every``: which steps are evaluated (held-out rollouts use their own fixed seed and
#:   leave the weights and the training streams alone; what an evaluation measures, eval_split,
#:   eval_questions, eval_samples, eval_temperature, is a result key);
#: * ``steps``: where the run stops (steps 1..n are the same for any total: resuming with a larger
#:   ``steps`` extends a run; nothing is scheduled over the total);
#: * ``micro_batch``: how the batch is cut for forward/backward (the gradient is the full batch's,
#:   up to rounding).
#:
#: ``dtype`` and ``teacher_dtype`` ARE result keys, unlike a diagnose run's ``dtype``: the forward
#: precision enters every update and compounds over the steps, so one run mixing float32 and
#: bfloat16 steps would be neither. So is ``rollout_chunk`` (it fixes the sampling seeds).
TRAIN_NON_RESULT_KEYS = frozenset(
    {
        "out_dir",
        "device",
        "teacher_device",
        "progress",
        "tensorboard",
        "report_to",
        "project",
        "run_name",
        "save_every",
        "keep_checkpoints",
        "eval_every",
        "steps",
        "micro_batch",
    }
)


class TrainConfig(RunSettings):
    """OPD run configuration (YAML-loadable with :meth:`from_yaml`)."""

    model_config = ConfigDict(extra="forbid")

    NON_RESULT_KEYS: ClassVar[frozenset[str]] = TRAIN_NON_RESULT_KEYS
    #: Keys added after runs were written, with the value those runs used (none yet).
    LEGACY_VALUES: ClassVar[dict[tuple[str, str], Any]] = {}
    preset: Literal["paper-b"] | None = Field(
        None,
        description="'paper-b': every key this config does not set takes the value of paper B's authors' scripts "
        "(opdlens.opd.presets.PAPER_B, each value with its source file; docs/OPD.md); keys set here win",
    )

    teacher: str = Field("smollm2", description="same tokenizer as the student (checked)")
    train_split: str = Field("train", description="split of the training questions")
    train_questions: int | None = Field(512, description="number of training questions (None: all)")
    eval_split: str = Field("test", description="split of the held-out questions")
    eval_questions: int | None = Field(
        32, ge=0, description="held-out questions (None: all of the split; 0: no held-out evaluation)"
    )

    student_template: str = Field(
        "same", description="student prompt: a TEMPLATES name or a format string with {prompt}"
    )
    teacher_template: str = Field(
        "same", description="teacher prompt: a TEMPLATES name or a format string ({prompt}, {answer})"
    )
    teacher_temperature: float = Field(
        1.0, description="teacher logits are divided by it (authors' TEACHER_TEMPERATURE)"
    )
    teacher_context: str | None = Field(
        None,
        description="a diagnose teacher context (a registered one that needs no summary) instead of teacher_template",
    )
    context_rollouts: int = Field(4, ge=1, description="student rollouts per question to find 1c/1c1w solutions")
    student_thinking: bool | None = Field(
        None, description="enable_thinking of the student's chat template (None: template default)"
    )
    teacher_thinking: bool | None = Field(
        None, description="enable_thinking of the teacher's chat template; false for a non-thinking teacher"
    )

    loss: str = Field("opd", description=f"one of: {', '.join(LOSSES)} (docs/OPD.md)")
    k: int = Field(16, ge=0, description="top-k size (authors' LOG_PROB_TOP_K); loss opd: 0 = sampled-token")
    topk_set: Literal["student", "teacher", "intersection", "union", "symmetric_difference"] = Field(
        "student", description="loss opd: the token set (authors' TOP_K_STRATEGY; intersection = overlap-only loss)"
    )
    topk_weight: Literal["student", "teacher", "uniform"] = Field(
        "student", description="loss opd: w_v = p/P(set), q/Q(set) or uniform (authors' REWARD_WEIGHT_MODE)"
    )
    jsd_beta: float = Field(0.5, description="loss jsd: teacher weight of the mixture")
    reduction: Literal["token_mean", "seq_sum", "seq_mean"] = Field("token_mean", description="loss aggregation")
    outcome_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the GRPO outcome advantage added to the distillation reward (needs samples_per_prompt >= 2)",
    )
    metrics_k: int = Field(16, ge=1, description="top-k size of the logged overlap metrics")
    metrics_chunk: int = Field(
        1024, ge=0, description="per-position chunk of the overlap curves (0: off; authors: 1024)"
    )

    lr: float = Field(1e-6, description="AdamW learning rate (paper: 1e-6)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    max_grad_norm: float | None = Field(1.0, description="gradient clipping (None: off)")
    batch_unit: Literal["rollouts", "prompts"] = Field(
        "rollouts",
        description="what batch_size counts: 'rollouts' (a step draws batch_size / samples_per_prompt prompts) "
        "or 'prompts' (a step draws batch_size prompts and trains on batch_size x samples_per_prompt rollouts, "
        "as the authors' MINI_BATCH_SIZE, which verl multiplies by rollout.n)",
    )
    batch_size: int = Field(
        64,
        description="size of one optimizer step over all processes, in the unit of batch_unit (default: rollouts); "
        "the authors: 64 prompts x 4 rollouts = 256 rollouts (preset paper-b)",
    )
    samples_per_prompt: int = Field(1, description="rollouts per question (authors' N_RESPONSES: 4)")
    prompt_order: Literal["random", "sequential"] = Field(
        "random",
        description="how a step's prompts are drawn: 'random' (seeded by (seed, step), with replacement across "
        "steps) or 'sequential' (consecutive blocks of the training questions in their loaded order, wrapping "
        "around: epochs, as the authors' data.shuffle=False)",
    )
    micro_batch: int = Field(8, description="rollouts per forward/backward pass")
    rollout_chunk: int | None = Field(
        None,
        ge=1,
        description="questions per sampling call, each seeded by (seed, step, chunk); set it so that runs "
        "with different process counts draw identical rollouts (None: one call per process)",
    )
    steps: int = Field(100, description="optimizer steps")

    eval_every: int = Field(10, ge=0, description="held-out evaluation period in steps (0: off)")
    eval_at_start: bool = Field(
        True, description="also evaluate before the first step (authors' trainer.val_before_train: False)"
    )
    eval_task_args: dict[str, Any] | None = Field(
        None,
        description="task arguments of the held-out questions (None: task_args), e.g. another path= for a local "
        "file task whose one file is one split; the held-out answers are graded by this task",
    )
    eval_temperature: float = Field(
        1.0, gt=0, description="sampling temperature of the held-out rollouts (authors' val_kwargs.temperature: 0.7)"
    )
    eval_top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="nucleus (top-p) truncation of the held-out sampling: the smallest set of most likely tokens "
        "whose probability reaches top_p, renormalised (1: none; authors' val_kwargs.top_p: 0.95)",
    )
    eval_max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="generation budget of a held-out rollout (None: the training budget; authors' "
        "MAX_VAL_RESP_LENGTH: 31,744)",
    )
    eval_samples: int = Field(
        1,
        ge=1,
        description="held-out rollouts per question; logged as eval_avg_at_n (mean accuracy over all samples) and "
        "eval_pass_at_n (share of questions with a correct sample) (authors' val_kwargs.n: 16)",
    )
    audit_every: int = Field(
        0,
        ge=0,
        description="every N steps, audit the training loss's gradient at the nodes of audit_probe against its "
        "ideal gradient (P_succ fixed from the probe run; docs/AUDIT.md), logged as audit/align[<loss>][<teacher>] "
        "(0: off)",
    )
    audit_probe: str | None = Field(None, description="a finished diagnose run directory: the probe of audit_every")
    save_every: int = Field(50, ge=0, description="checkpoint period in steps (0: off)")
    keep_checkpoints: int = Field(2, ge=0, description="checkpoints kept (0: all)")
    out_dir: Path = Field(Path("runs/opd"), description="run directory (metrics.jsonl, checkpoints/, tb/)")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'")
    teacher_device: str | None = Field(
        None,
        description="the teacher's device (None: the student's): a teacher too big to share the student's GPU "
        "goes on another one ('cuda:1') or the CPU ('cpu'); with several processes, '+N' puts each process's teacher "
        "on GPU local rank + N (4 students on GPUs 0-3, their teachers on 4-7: '+4')",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="compute dtype of the forward passes; the student's weights and optimizer state stay "
        "float32 (mixed precision), the losses are computed in float32",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="with several processes: 'ddp' (every process holds the whole student and AdamW state) or "
        "'fsdp' (FSDP2: weights, gradients and AdamW state sharded over the processes, for students that do not "
        "fit one GPU; checkpoints are gathered to whole tensors, so they resume on any process count)",
    )
    rollout_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="weights the rollout engine samples from: 'float32' (the master weights themselves) or "
        "'bfloat16' (a bf16 copy refreshed after every optimizer step, as verl's vLLM rollout); the loss always "
        "scores the tokens with the student recomputed in the training forward (docs/OPD.md, rollout weights)",
    )
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the teacher's weights (default: dtype)"
    )
    report_to: list[Literal["tensorboard", "wandb", "trackio", "swanlab", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers, each through its own library (imported only when named; pip extras of "
        "the same names); metrics.jsonl is written either way (opdlens.opd.trackers)",
    )
    tensorboard: bool | None = Field(
        None, description="older spelling: false removes tensorboard from report_to, true adds it"
    )
    project: str = Field("opdlens", min_length=1, description="the trackers' project (wandb, trackio, swanlab, mlflow)")
    run_name: str | None = Field(None, description="the trackers' run name (default: the out_dir's name)")
    progress: bool = Field(True, description="progress bar")

    cold_start: ColdStartStage | None = Field(None, description="stage before OPD: SFT on filtered teacher rollouts")
    template_selection: TemplateStage | None = Field(
        None, description="stage before OPD: pick the best-aligned template"
    )
    select_teacher_prompts: TeacherPromptStage | None = Field(
        None,
        description="stage before OPD (paper B's recipe): keep the training prompts found in the teacher's "
        "post-training prompts",
    )
    drop_duplicate_prompts: DuplicatePromptStage | None = Field(
        None,
        description="stage before OPD: drop the training prompts found in a reference set (paper B's control "
        "set; de-contamination)",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fill the keys a config leaves unset from its ``preset`` (explicit keys win)."""
        if isinstance(data, dict) and "prompt_selection" in data:
            raise OpdlensError(
                "prompt_selection is gone (it dropped prompts found in its 'against' file): use "
                "drop_duplicate_prompts: {reference: FILE} for that, or select_teacher_prompts: {reference: FILE} "
                "for paper B's recipe (train on the teacher's post-training prompts); docs/OPD.md"
            )
        if isinstance(data, dict) and isinstance(data.get("preset"), str) and data["preset"] in PRESETS:
            return {**preset_values(data["preset"]), **data}
        return data

    @field_validator("student_template", "teacher_template")
    @classmethod
    def _template(cls, v: str) -> str:
        resolve_template(v)
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"{v!r} is not a device: use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'")
        return v

    @field_validator("teacher_device")
    @classmethod
    def _teacher_device(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|\+\d+", v):
            raise ValueError(
                f"{v!r} is not a device: use 'cpu', 'cuda', 'cuda:<index>' or '+<offset>' "
                "(each process's GPU index plus the offset)"
            )
        return v

    @field_validator("teacher_context")
    @classmethod
    def _context(cls, v: str | None) -> str | None:
        if v is not None and not get_context(v).trainable:
            raise ValueError(
                f"context {v!r} needs a summary (a summariser model in the loop); "
                f"training supports {', '.join(trainable_contexts())}"
            )
        return v

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        get_loss(v)
        return v

    @property
    def trackers(self) -> list[str]:
        """``report_to`` with the older ``tensorboard`` key applied, each name once."""
        names = [n for n in dict.fromkeys(self.report_to) if not (n == "tensorboard" and self.tensorboard is False)]
        return names + ["tensorboard"] if self.tensorboard and "tensorboard" not in names else names

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.batch_size < 1 or self.micro_batch < 1 or self.samples_per_prompt < 1:
            raise OpdlensError("batch_size, micro_batch and samples_per_prompt must be >= 1")
        if self.batch_unit == "rollouts" and self.batch_size % self.samples_per_prompt:
            raise OpdlensError(
                f"batch_size {self.batch_size} (rollouts) must be a multiple of samples_per_prompt "
                f"{self.samples_per_prompt}; or count it in prompts: batch_unit: prompts"
            )
        if self.lr <= 0:
            raise OpdlensError(f"lr must be > 0, got {self.lr}")
        if self.steps < 0:
            raise OpdlensError(f"steps must be >= 0, got {self.steps}")
        if self.k < (0 if self.loss == "opd" else 1):
            raise OpdlensError(f"k must be >= 1 for loss {self.loss!r} (k = 0 means sampled-token only for loss opd)")
        if self.teacher_context is not None and self.teacher_template != "same":
            raise OpdlensError(
                "set either teacher_context (a diagnose teacher configuration) or teacher_template, not both"
            )
        if self.teacher_temperature <= 0 or self.temperature <= 0:
            raise OpdlensError("temperature and teacher_temperature must be > 0")
        if self.outcome_weight > 0 and self.samples_per_prompt < 2:
            raise OpdlensError(
                "outcome_weight > 0 needs samples_per_prompt >= 2 (GRPO compares rollouts of one question)"
            )
        if self.audit_every > 0 and not self.audit_probe:
            raise OpdlensError("audit_every > 0 needs audit_probe: a finished diagnose run directory")
        if self.loss == "sampled" and self.temperature != 1.0:
            warnings.warn(
                f"loss 'sampled' with sampling temperature {self.temperature}: the sampled-token estimator is "
                "unbiased for the reverse KL only for on-policy samples at temperature 1",
                stacklevel=2,
            )
        return self

    @property
    def prompts_per_step(self) -> int:
        """Training questions drawn per optimizer step (over all processes)."""
        return self.batch_size if self.batch_unit == "prompts" else self.batch_size // self.samples_per_prompt

    @property
    def rollouts_per_step(self) -> int:
        """Rollouts one optimizer step trains on (over all processes)."""
        return self.prompts_per_step * self.samples_per_prompt

    def loss_options(self, denominator: float | None = None) -> LossOptions:
        """The :class:`~opdlens.opd.registry.LossOptions` of this run (one place, read by the step)."""
        return LossOptions(
            k=self.k,
            topk_set=self.topk_set,
            topk_weight=self.topk_weight,
            beta=self.jsd_beta,
            reduction=self.reduction,
            denominator=denominator,
            student_temperature=self.temperature,
            teacher_temperature=self.teacher_temperature,
        )

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
        """Load a config from YAML (optionally nested under ``train:``) with command-line
        ``overrides`` (:func:`opdlens.config.apply_overrides`, keys relative to the config
        itself); unknown keys and bad values raise :class:`OpdlensError`."""
        from opdlens.config import apply_overrides, config_where, read_yaml, set_overrides, validate_config

        data = read_yaml(path)
        data = data["train"] if isinstance(data.get("train"), dict) else data
        data = apply_overrides(data, overrides, cls)
        return set_overrides(validate_config(cls, data, config_where(path, overrides)), overrides)

    def to_yaml(self, path: str | Path) -> None:
        """Write the config as YAML, headed by the command-line overrides it was read with (a comment)."""
        from opdlens.config import overrides_comment
        from opdlens.io import atomic_write

        text = overrides_comment(self) + yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        atomic_write(path, text)
