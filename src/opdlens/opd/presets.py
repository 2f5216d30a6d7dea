"""Named presets of :class:`~opdlens.opd.config.TrainConfig`: ``preset: paper-b`` fills every key
the config does not set with the value of paper B's authors, each with its source.

The sources are files of the authors' code (github thunlp/OPD, commit 0a44395), read, not copied:

* ``on_policy_distillation.sh``: the OPD launch script (its exported variables and verl overrides);
* ``verl/verl/trainer/config/optim/fsdp.yaml`` and ``verl/verl/trainer/config/actor/dp_actor.yaml``:
  verl's defaults the script does not override (optimizer, gradient clipping);
* ``verl/verl/workers/fsdp_workers.py``: the mini-batch multiplied by ``rollout.n``, the mixed
  precision of the actor and the teacher (``reward_model``);
* ``verl/verl/trainer/ppo/ray_trainer.py``: the logged top-k metrics and their 1,024-token chunks;
* ``verl/verl/trainer/config/rollout/rollout.yaml``: the vLLM rollout's weight dtype;
* ``scripts/infer/vllm_rollout.py`` and ``LlamaFactory/examples/train_full/qwen3_base_full_sft.yaml``:
  the cold start's teacher rollouts and SFT (:data:`COLD_START_PAPER`).

What depends on the models and data (student, teacher, chat-template thinking switches, data
files, number of steps) is set by the ``configs/paper-b-*.yaml`` files, not by the preset.
docs/OPD.md maps every knob to the authors' name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opdlens.errors import OpdlensError

SCRIPT = "on_policy_distillation.sh"
OPTIM = "verl/verl/trainer/config/optim/fsdp.yaml"
ACTOR = "verl/verl/trainer/config/actor/dp_actor.yaml"
WORKERS = "verl/verl/workers/fsdp_workers.py"
TRAINER = "verl/verl/trainer/ppo/ray_trainer.py"
ROLLOUT_CFG = "verl/verl/trainer/config/rollout/rollout.yaml"


@dataclass(frozen=True)
class Sourced:
    """A preset value and where it comes from (a file of the authors' code, and the name there)."""

    value: Any
    source: str


#: paper B's OPD setting as its authors' scripts run it.
PAPER_B: dict[str, Sourced] = {
    "loss": Sourced("opd", f"{SCRIPT}: ADV_ESTIMATOR=token_reward_direct"),
    "k": Sourced(16, f"{SCRIPT}: LOG_PROB_TOP_K=16"),
    "topk_set": Sourced("student", f"{SCRIPT}: TOP_K_STRATEGY=only_stu"),
    "topk_weight": Sourced("student", f"{SCRIPT}: REWARD_WEIGHT_MODE=student_p"),
    "temperature": Sourced(1.0, f"{SCRIPT}: TEMPERATURE=1.0 (actor_rollout_ref.rollout.temperature)"),
    "teacher_temperature": Sourced(1.0, f"{SCRIPT}: TEACHER_TEMPERATURE=1.0"),
    "reduction": Sourced("token_mean", f"{SCRIPT}: LOSS_AGG_MODE=token-mean"),
    "outcome_weight": Sourced(0.0, f"{SCRIPT}: ADV_ESTIMATOR=token_reward_direct (no GRPO term)"),
    "lr": Sourced(1e-6, f"{SCRIPT}: actor_rollout_ref.actor.optim.lr=1e-6"),
    "warmup_steps": Sourced(0, f"{SCRIPT}: LR_SCHEDULER unset, so {OPTIM}: lr_warmup_steps_ratio 0.0, constant"),
    "weight_decay": Sourced(0.01, f"{OPTIM}: weight_decay 0.01"),
    "betas": Sourced((0.9, 0.999), f"{OPTIM}: betas [0.9, 0.999]"),
    "max_grad_norm": Sourced(1.0, f"{ACTOR}: grad_clip 1.0"),
    "batch_unit": Sourced(
        "prompts",
        f"{SCRIPT}: data.train_batch_size = ppo_mini_batch_size = MINI_BATCH_SIZE prompts; {WORKERS} "
        "multiplies ppo_mini_batch_size by rollout.n",
    ),
    "batch_size": Sourced(64, f"{SCRIPT}: MINI_BATCH_SIZE=64 (one update per step: 64 x 4 = 256 rollouts)"),
    "samples_per_prompt": Sourced(4, f"{SCRIPT}: N_RESPONSES=4 (actor_rollout_ref.rollout.n)"),
    "prompt_order": Sourced("sequential", f"{SCRIPT}: data.shuffle=False"),
    "train_questions": Sourced(None, f"{SCRIPT}: data.train_files, the whole file (trainer.total_epochs=1)"),
    "max_new_tokens": Sourced(7168, f"{SCRIPT}: MAX_RESP_LENGTH=7168"),
    "eval_questions": Sourced(None, f"{SCRIPT}: data.val_files, the whole files"),
    "eval_samples": Sourced(16, f"{SCRIPT}: actor_rollout_ref.rollout.val_kwargs.n=16"),
    "eval_temperature": Sourced(0.7, f"{SCRIPT}: val_kwargs.temperature=0.7"),
    "eval_top_p": Sourced(0.95, f"{SCRIPT}: val_kwargs.top_p=0.95"),
    "eval_max_new_tokens": Sourced(31744, f"{SCRIPT}: MAX_VAL_RESP_LENGTH=31744 (val_kwargs.max_tokens)"),
    "eval_every": Sourced(20, f"{SCRIPT}: trainer.test_freq=20"),
    "eval_at_start": Sourced(False, f"{SCRIPT}: trainer.val_before_train=False"),
    "save_every": Sourced(20, f"{SCRIPT}: trainer.save_freq=20"),
    "dtype": Sourced(
        "bfloat16",
        f"{SCRIPT}: MODEL_DTYPE=fp32 weights; {WORKERS}: FSDP mixed precision param_dtype bf16 and "
        "bf16 autocast in the forward",
    ),
    "teacher_dtype": Sourced(
        "float32",
        f"{SCRIPT}: +reward_model.model.dtype=$MODEL_DTYPE (fp32); {WORKERS}: its forward under bf16 autocast",
    ),
    "parallel": Sourced(
        "fsdp",
        f"{ACTOR}: strategy fsdp (verl's FSDP1 workers, {WORKERS}; ours: FSDP2), param/optimizer offload off "
        f"in {SCRIPT}",
    ),
    "rollout_dtype": Sourced(
        "bfloat16",
        f"{SCRIPT}: actor_rollout_ref.rollout.name=vllm, {ROLLOUT_CFG}: dtype bfloat16; {WORKERS}: rollout_mode "
        "copies the FSDP actor's weights into vLLM before each generation",
    ),
    "metrics_k": Sourced(16, f"{TRAINER}: the top-k metrics use LOG_PROB_TOP_K"),
    "metrics_chunk": Sourced(1024, f"{TRAINER}: chunk_size = 1024"),
}

LLAMAFACTORY = "LlamaFactory/examples/train_full/qwen3_base_full_sft.yaml"
ROLLOUT = "scripts/infer/vllm_rollout.py"
PAPER = "paper B's text (as issue 26 and PAPERS.md state it)"

#: The authors' off-policy cold start (``cold_start: {recipe: paper}``): teacher rollouts filtered
#: by rejection sampling, then full SFT with LlamaFactory. Where the paper's text and the rollout
#: script at 0a44395 differ (the script samples at temperature 1.0 up to 7,168 tokens), the paper wins.
COLD_START_PAPER: dict[str, Sourced] = {
    "n_per_question": Sourced(1, f"{ROLLOUT}: num_rollouts = 1"),
    "temperature": Sourced(0.7, f"{PAPER} (the script {ROLLOUT}: temperature=1.0)"),
    "top_p": Sourced(0.95, f"{ROLLOUT}: top_p=0.95"),
    "max_new_tokens": Sourced(12288, f"{PAPER} (the script {ROLLOUT}: max_tokens=7168)"),
    "teacher_thinking": Sourced(False, f"{ROLLOUT}: DEFAULT_ENABLE_THINKING = False (README: Qwen3-4B non-thinking)"),
    "filter": Sourced("paper", f"{ROLLOUT}: is_valid_output (no \\boxed, repeated lines / n-grams / blocks)"),
    "max_attempts": Sourced(3, f"{ROLLOUT}: DEFAULT_MAX_ATTEMPTS_PER_ROLLOUT = 3"),
    "lr": Sourced(1e-5, f"{LLAMAFACTORY}: learning_rate 1.0e-5"),
    "lr_schedule": Sourced("cosine", f"{LLAMAFACTORY}: lr_scheduler_type cosine"),
    "warmup_ratio": Sourced(0.05, f"{LLAMAFACTORY}: warmup_ratio 0.05"),
    "epochs": Sourced(2, f"{LLAMAFACTORY}: num_train_epochs 2.0"),
    "batch_size": Sourced(
        64, f"{LLAMAFACTORY}: per_device_train_batch_size 8 x gradient_accumulation_steps 1 x 8 GPUs (README.md)"
    ),
    "max_seq_tokens": Sourced(14336, f"{LLAMAFACTORY}: cutoff_len 14336"),
}

DEDUP = "scripts/infer/dedup_deepmath.py"

#: The authors' prompt matching (``recipe: paper`` of ``select_teacher_prompts`` and
#: ``drop_duplicate_prompts``): how they built the control set, DeepMath minus DAPO-Math-17K (§5.2).
PROMPT_MATCH_PAPER: dict[str, Sourced] = {
    "suffixes": Sourced(
        [" Please reason step by step, and put your final answer within \\boxed{}."],
        f"{DEDUP}: extract_dapo_question strips this suffix, then white space",
    ),
    "exact": Sourced("stripped", f"{DEDUP}: exact string match after the strip (dapo_set membership)"),
    "near": Sourced("embedding", f"{DEDUP}: SentenceTransformer embeddings, FAISS inner product, top-1"),
    "embedding_model": Sourced(
        "sentence-transformers/all-mpnet-base-v2", f"{DEDUP}: model/all-mpnet-base-v2, normalised (normalize_L2)"
    ),
    "threshold": Sourced(0.6, f"{DEDUP}: threshold = 0.6 (similarity >= threshold is a duplicate)"),
}

#: Preset name -> values.
PRESETS: dict[str, dict[str, Sourced]] = {"paper-b": PAPER_B}


def preset_values(name: str) -> dict[str, Any]:
    """The config values of preset ``name`` (without their sources)."""
    if name not in PRESETS:
        raise OpdlensError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return {k: v.value for k, v in PRESETS[name].items()}


def with_recipe(data: Any, values: dict[str, Sourced]) -> Any:
    """A stage's raw config with ``recipe: paper``: the keys it leaves unset take ``values``
    (the authors', without their sources); keys it sets win. Anything else unchanged."""
    if isinstance(data, dict) and data.get("recipe") == "paper":
        return {**{k: v.value for k, v in values.items()}, **data}
    return data
