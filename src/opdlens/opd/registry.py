"""The one table of OPD loss names: each loss of :mod:`opdlens.opd.losses` registered with whose
definition it is and one line of documentation, and the dispatch by name (config validation,
the training step and the docs read it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opdlens.errors import OpdlensError
from opdlens.opd.losses import (
    LossOutput,
    Reduction,
    TopkSet,
    WeightMode,
    forward_kl,
    full_rkl,
    generalized_jsd,
    opd_topk,
    sampled_token_rkl,
    topk_rkl,
)


@dataclass(frozen=True)
class LossOptions:
    """Knobs every registered loss receives (each uses the ones it needs)."""

    k: int = 16
    topk_set: TopkSet = "student"
    topk_weight: WeightMode = "student"
    beta: float = 0.5
    reduction: Reduction = "token_mean"
    denominator: float | None = None
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LossOptions], LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, whose definition it is (``authors`` | ``ours`` |
    ``comparison``) and one line of documentation."""

    name: str
    fn: LossFn
    origin: str
    doc: str
    uses: tuple[str, ...] = field(default_factory=tuple)


#: The one table of loss names (config validation, dispatch and docs read it).
LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, origin: str, doc: str, uses: tuple[str, ...] = ()) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise OpdlensError(f"loss {name!r} is registered twice")
        LOSSES[name] = LossSpec(name, fn, origin, doc, uses)
        return fn

    return deco


def _common(o: LossOptions) -> dict:
    return dict(reduction=o.reduction, denominator=o.denominator, teacher_temperature=o.teacher_temperature)


@register_loss(
    "opd",
    origin="authors",
    uses=("k", "topk_set", "topk_weight", "temperature", "teacher_temperature"),
    doc="policy gradient on r_v = -w_v (log p(v) - log q(v)) over the chosen top-k set; k=0: sampled token",
)
def _opd(z: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, m: torch.Tensor, o: LossOptions) -> LossOutput:
    return opd_topk(
        z,
        w,
        tok,
        m,
        k=o.k,
        topk_set=o.topk_set,
        weight=o.topk_weight,
        student_temperature=o.student_temperature,
        **_common(o),
    )


@register_loss(
    "sampled",
    origin="authors",
    uses=("teacher_temperature",),
    doc="sampled-token REINFORCE estimator of the reverse KL (the authors' k=0, student at T=1)",
)
def _sampled(z: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, m: torch.Tensor, o: LossOptions) -> LossOutput:
    return sampled_token_rkl(z, w, tok, m, **_common(o))


@register_loss(
    "topk_renorm",
    origin="ours",
    uses=("k", "teacher_temperature"),
    doc="KL between student and teacher renormalised over the student's top-k (0 at k=1)",
)
def _topk_renorm(z: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, m: torch.Tensor, o: LossOptions) -> LossOutput:
    return topk_rkl(z, w, m, k=o.k, renormalize=True, **_common(o))


@register_loss(
    "topk_partial",
    origin="ours",
    uses=("k", "teacher_temperature"),
    doc="partial reverse-KL sum over the student's top-k (unnormalised; can be negative)",
)
def _topk_partial(z: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, m: torch.Tensor, o: LossOptions) -> LossOutput:
    return topk_rkl(z, w, m, k=o.k, **_common(o))


@register_loss(
    "topk_tail",
    origin="ours",
    uses=("k", "teacher_temperature"),
    doc="KL over the student's top-k plus the remaining mass as one bucket (a lower bound of the full KL)",
)
def _topk_tail(z: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, m: torch.Tensor, o: LossOptions) -> LossOutput:
    return topk_rkl(z, w, m, k=o.k, tail=True, **_common(o))


@register_loss(
    "full", origin="ours", uses=("teacher_temperature",), doc="exact full-vocabulary reverse KL per position"
)
def _full(z: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, m: torch.Tensor, o: LossOptions) -> LossOutput:
    return full_rkl(z, w, m, **_common(o))


@register_loss("forward_kl", origin="comparison", uses=("teacher_temperature",), doc="forward KL(q||p) (supervised KD)")
def _fkl(z: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, m: torch.Tensor, o: LossOptions) -> LossOutput:
    return forward_kl(z, w, m, **_common(o))


@register_loss("jsd", origin="comparison", uses=("jsd_beta", "teacher_temperature"), doc="GKD generalised JSD")
def _jsd(z: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, m: torch.Tensor, o: LossOptions) -> LossOutput:
    return generalized_jsd(z, w, m, beta=o.beta, **_common(o))


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``; a wrong name lists the valid ones."""
    if name not in LOSSES:
        hint = " ('topk' is now 'topk_renorm' (ours) or 'opd' (the authors'))" if name == "topk" else ""
        raise OpdlensError(f"unknown OPD loss {name!r}{hint}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def opd_loss(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    options: LossOptions | None = None,
    **kw: object,
) -> LossOutput:
    """Dispatch by registered name (``options`` or keyword overrides of :class:`LossOptions`)."""
    opts = options if options is not None else LossOptions()
    if kw:
        from dataclasses import replace

        opts = replace(opts, **kw)  # type: ignore[arg-type]
    return get_loss(name).fn(student_logits, teacher_logits, tokens, mask, opts)
