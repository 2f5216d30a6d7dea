"""On-policy distillation (PAPERS.md, part B): losses, monitoring metrics, trainer and recipes.

* :mod:`opdlens.opd.losses`  sampled-token / top-k / full reverse KL, forward KL, generalised JSD
* :mod:`opdlens.opd.metrics` top-k overlap ratio, overlap-token advantage, entropy gap, shared mass
* :mod:`opdlens.opd.trainer` :class:`TrainConfig`, :func:`train` (``opdlens train CONFIG.yaml``)
* :mod:`opdlens.opd.recipes` off-policy cold start, teacher-aligned template selection
* :mod:`opdlens.opd.cli`     ``train_cmd`` and the diagnose -> train link
* :mod:`opdlens.opd.demo`    ``python -m opdlens.opd.demo``: a short SmolLM2 run lowering reverse KL
"""

from opdlens.opd.losses import (
    LossOutput,
    forward_kl,
    full_rkl,
    generalized_jsd,
    opd_loss,
    reduce_tokens,
    sampled_token_rkl,
    topk_rkl,
)
from opdlens.opd.metrics import TokenMetrics, token_metrics
from opdlens.opd.trainer import TEMPLATES, OPDTrainer, TrainConfig, TrainResult, read_metrics, train

__all__ = [
    "LossOutput", "forward_kl", "full_rkl", "generalized_jsd", "opd_loss", "reduce_tokens", "sampled_token_rkl",
    "topk_rkl", "TokenMetrics", "token_metrics", "TEMPLATES", "OPDTrainer", "TrainConfig", "TrainResult",
    "read_metrics", "train",
]
