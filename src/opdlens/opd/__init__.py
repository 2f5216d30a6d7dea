"""On-policy distillation (paper B, its mechanism and recipe): losses, monitoring metrics, trainer and recipes.

* :mod:`opdlens.opd.logprobs`   log-softmax and top-k over the vocabulary, once per micro-batch
* :mod:`opdlens.opd.losses`     the loss registry: the authors' top-k OPD, ours (top-k variants, full RKL), FKL, JSD
* :mod:`opdlens.opd.metrics`    our token signals and the authors' top-k metrics (overlap, masses, advantages, splits)
* :mod:`opdlens.opd.config`     :class:`TrainConfig` (every field described) and the prompt templates
* :mod:`opdlens.opd.stages`     the configs of the stages before OPD (cold start, template selection, prompt matching)
* :mod:`opdlens.opd.presets`    ``preset: paper-b`` and ``cold_start: {recipe: paper}``: the authors' values, sourced
* :mod:`opdlens.opd.scoring`    contexts, student rollouts, student/teacher logits under mixed precision
* :mod:`opdlens.opd.step`       the loss step (micro-batches, global normalisation, GRPO outcome term)
* :mod:`opdlens.opd.checkpoint` safetensors + JSON checkpoints (no pickle)
* :mod:`opdlens.opd.runlog`     metric sums, metrics.jsonl, TensorBoard
* :mod:`opdlens.opd.parallel`   data parallelism through accelerate (DDP)
* :mod:`opdlens.opd.trainer`    :class:`OPDTrainer`: one optimizer step, the held-out evaluation
* :mod:`opdlens.opd.run`        :func:`train` (``opdlens train CONFIG.yaml``): run identity, stages, the step loop, resume
* :mod:`opdlens.opd.recipes`    cold start, template selection, prompt selection (config stages; matching in prompts.py)
* :mod:`opdlens.opd.cli`     ``train_cmd`` and the diagnose -> train link
* :mod:`opdlens.opd.demo`    ``python -m opdlens.opd.demo``: a short SmolLM2 run lowering reverse KL
"""

from opdlens.opd.config import TEMPLATES, TrainConfig
from opdlens.opd.losses import (
    LossOutput,
    forward_kl,
    full_rkl,
    generalized_jsd,
    opd_topk,
    reduce_tokens,
    sampled_token_rkl,
    topk_rkl,
)
from opdlens.opd.metrics import TokenMetrics, token_metrics
from opdlens.opd.registry import LOSSES, opd_loss
from opdlens.opd.run import TrainResult, train
from opdlens.opd.runlog import read_metrics
from opdlens.opd.trainer import OPDTrainer

__all__ = [
    "LOSSES",
    "LossOutput",
    "opd_topk",
    "forward_kl",
    "full_rkl",
    "generalized_jsd",
    "opd_loss",
    "reduce_tokens",
    "sampled_token_rkl",
    "topk_rkl",
    "TokenMetrics",
    "token_metrics",
    "TEMPLATES",
    "OPDTrainer",
    "TrainConfig",
    "TrainResult",
    "read_metrics",
    "train",
]
