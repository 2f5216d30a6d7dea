"""The configs of the stages a training run may run before OPD, once (:mod:`opdlens.opd.recipes`):
the off-policy cold start (SFT on teacher rollouts), the teacher-template selection, and the two
prompt-matching stages (the teacher-aligned set and its control). ``recipe: paper`` fills a
stage's unset keys with paper B's values (:func:`opdlens.opd.presets.with_recipe`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from opdlens.opd.presets import COLD_START_PAPER, PROMPT_MATCH_PAPER, with_recipe

__all__ = ["ColdStartStage", "TemplateStage", "PromptMatchStage", "TeacherPromptStage", "DuplicatePromptStage"]


class ColdStartStage(BaseModel):
    """Off-policy cold start before OPD: SFT of the student on filtered teacher rollouts.

    ``recipe: paper`` fills the keys not set with the authors' values (teacher rollouts at T = 0.7
    up to 12,288 tokens, rejected without ``\\boxed{}`` or with repeated text, 3 attempts; SFT 2
    epochs, cosine schedule with 5 % warm-up, batch 64, cutoff 14,336 tokens:
    :data:`opdlens.opd.presets.COLD_START_PAPER`, each with its source); ``ours`` (default) keeps
    ours (1 epoch, constant lr, batch 8, incomplete/degenerate filter, 1 attempt)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    recipe: Literal["ours", "paper"] = Field(
        "ours", description="'paper': unset keys take the authors' values (docs/OPD.md, cold start); 'ours': ours"
    )
    questions: int | None = Field(None, ge=1, description="training questions used (default: all of train_questions)")
    n_per_question: int = Field(1, ge=1, description="teacher rollouts per question")
    temperature: float = Field(0.7, gt=0, description="teacher sampling temperature (paper: 0.7)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus truncation of the teacher sampling (1: none)")
    max_new_tokens: int | None = Field(None, ge=1, description="rollout budget (default: the run's max_new_tokens)")
    teacher_thinking: bool | None = Field(
        None, description="enable_thinking of the teacher's chat template here (None: the run's teacher_thinking)"
    )
    filter: Literal["ours", "paper"] = Field(
        "ours",
        description="'ours': drop incomplete (no EOS) and degenerate (repeated tokens) rollouts; 'paper': drop "
        "rollouts whose text has no \\boxed or repeats (a line, a 100-character window, a 50-character block)",
    )
    max_attempts: int = Field(
        1, ge=1, description="samples drawn per rollout slot until one passes the filter (authors: 3)"
    )
    lr: float = Field(1e-5, gt=0, description="SFT learning rate (peak, with a schedule)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="SFT learning-rate schedule: constant, or linear warm-up then cosine decay to 0"
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the SFT optimizer steps spent warming up")
    epochs: int = Field(1, ge=1, description="passes over the kept rollouts")
    batch_size: int = Field(8, ge=1, description="SFT batch size (rollouts per optimizer step)")
    micro_batch: int | None = Field(
        None, ge=1, description="rollouts per SFT forward/backward (gradient accumulation; None: batch_size)"
    )
    max_seq_tokens: int | None = Field(
        None,
        ge=2,
        description="cutoff of prompt + response tokens in SFT: longer responses are cut to fit (None: no cutoff)",
    )
    teacher_template: str | None = Field(None, description="the teacher's prompt (default: the run's teacher_template)")

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        """``recipe: paper``: the keys left unset take the authors' values (explicit keys win)."""
        return with_recipe(data, COLD_START_PAPER)


class TemplateStage(BaseModel):
    """Teacher-aligned template selection: the candidate with the highest initial top-k overlap
    becomes the run's template (``apply_to``: both prompts, or the teacher's only)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    candidates: dict[str, str] = Field(description="name -> template (a TEMPLATES name or a format string)")
    apply_to: Literal["both", "teacher"] = Field("both", description="whose prompt the template changes")
    questions: int = Field(8, ge=1, description="training questions scored per candidate")
    n_rollouts: int = Field(2, ge=1, description="student rollouts per question")
    max_new_tokens: int = Field(64, ge=1, description="rollout budget of the scoring")


class PromptMatchStage(BaseModel):
    """How the training prompts are matched against a reference file (:mod:`opdlens.opd.prompts`).

    ``recipe: paper`` fills the keys not set with the authors' values (``scripts/infer/dedup_deepmath.py``:
    the DAPO instruction suffix stripped, exact string match, then all-mpnet-base-v2 cosine >= 0.6:
    :data:`opdlens.opd.presets.PROMPT_MATCH_PAPER`); ``ours`` (default): no suffix, normalised exact
    match, MinHash Jaccard >= 0.8."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    recipe: Literal["ours", "paper"] = Field(
        "ours", description="'paper': unset keys take the authors' values (docs/OPD.md, prompt selection)"
    )
    reference: str = Field(
        description="file of reference prompts (JSONL/Parquet rows with 'prompt' (text or chat list) or "
        "'question', or one per line)"
    )
    suffixes: list[str] = Field(
        default_factory=list, description="instruction suffixes stripped from both sides before matching"
    )
    exact: Literal["stripped", "normalised"] = Field(
        "normalised",
        description="exact match: 'stripped' (equal strings after the suffix strip, the authors') or "
        "'normalised' (also lower case, words only)",
    )
    near: Literal["embedding", "minhash", "none"] = Field(
        "minhash", description="near match: embedding cosine, MinHash Jaccard of word shingles, or none"
    )
    threshold: float = Field(0.8, gt=0, le=1, description="near match when similarity >= threshold")
    embedding_model: str = Field(
        "sentence-transformers/all-mpnet-base-v2",
        description="sentence encoder of near: embedding (hub id or directory; mean pooling, unit norm)",
    )
    num_perm: int = Field(128, ge=16, description="MinHash permutations")
    shingle: int = Field(3, ge=1, description="word n-gram size of the shingles")

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        """``recipe: paper``: the keys left unset take the authors' values (explicit keys win)."""
        return with_recipe(data, PROMPT_MATCH_PAPER)


class TeacherPromptStage(PromptMatchStage):
    """Teacher-aligned prompt selection (paper B's recipe): keep only the training prompts found
    in the teacher's post-training prompts (``reference``), exactly or nearly."""


class DuplicatePromptStage(PromptMatchStage):
    """Drop the training prompts found in ``reference``, exactly or nearly: paper B's control set
    (DeepMath minus the teacher's post-training prompts), or de-contamination against an evaluation set."""
