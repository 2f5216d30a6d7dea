"""The audited losses: every loss of the trainer's registry (:data:`opdlens.opd.registry.LOSSES`)
swept over its knobs, the k1 / k2 / k3 KL estimators, MiniLLM, Dr. GRPO, OPD + outcome-reward
mixtures, and a user's own loss loaded by ``module:function``.

An :class:`AuditedLoss` evaluates its loss *with the loss's own code* on a batch of ``P``
single-position entries and returns ``Σ_p weight_p · L_p`` (a scalar to differentiate): its
``fn(z, w, tokens, weight, reward)`` takes the student's logits ``z [P, 1, V]`` (the leaf of the
autograd), the teacher's ``w [P, 1, V]``, the next token of each entry ``tokens [P, 1]``, the
entries' weights ``weight [P, 1]`` and a per-entry constant ``reward [P, 1]`` (the outcome
advantage ``r − b`` of a rollout for the losses that use outcomes, MiniLLM's reward-to-go).

``expectation`` says over what the audit averages the gradient (:mod:`opdlens.audit.gradients`):

* ``"none"``: the loss does not depend on the sampled token (full / top-k divergences);
* ``"student"``: sampled-token losses: the exact expectation over the student's next token,
  ``Σ_k P_θ(k) ∇L(k)``, not a sample;
* ``"rollouts"``: losses built on outcome rewards (Dr. GRPO, OPD + outcome reward): the mean
  over the rollouts the student drew at the node (its children with their successes), the only
  draws with a reward, exactly as the node table's ``align_drgrpo`` takes them;
* ``"path"``: MiniLLM: the path's own next token with the path's reward-to-go (the
  reward-to-go of the other children is not known), as ``align_minillm`` takes it.

A user's loss (``--loss module:function``) has the signature::

    def my_loss(student_logits, teacher_logits, tokens, mask):
        # student_logits, teacher_logits: [B, T, V] (float64 in the audit), tokens: [B, T] long
        # (the student's sampled token at each position), mask: [B, T] (1 = counts)
        return per_token_loss  # [B, T], differentiable in student_logits

and is audited as a sampled-token loss (the exact expectation over the student's next token,
right whether or not it reads ``tokens``).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from opdlens.errors import OpdlensError
from opdlens.opd.logprobs import log_probs
from opdlens.opd.losses import TOPK_SETS, WEIGHT_MODES, full_rkl
from opdlens.opd.registry import LOSSES, LossOptions

Tensor = torch.Tensor
Expectation = Literal["none", "student", "rollouts", "path"]
#: ``fn(z [P,1,V], w [P,1,V], tokens [P,1], weight [P,1], reward [P,1]) -> Σ weight · loss``
AuditFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

#: the k of the authors' top-k OPD swept by default (0 = sampled-token OPD)
KS: tuple[int, ...] = (0, 1, 4, 16, 64)
#: teacher temperatures swept by default (1 and the authors' sampling temperature 0.7)
TEACHER_TEMPERATURES: tuple[float, ...] = (1.0, 0.7)
#: β of the generalised JSD
JSD_BETAS: tuple[float, ...] = (0.1, 0.5, 0.9)
#: weight λ of the outcome advantage in OPD + outcome reward
MIX_LAMBDAS: tuple[float, ...] = (0.1, 1.0)


@dataclass(frozen=True)
class AuditedLoss:
    """One audited loss (see the module docstring). ``family``, ``topk_set``, ``weighting``,
    ``k`` and ``teacher_temperature`` label it in the tables and the figure (``k`` is None for
    losses without one; ``-1`` would be meaningless, so 0 means sampled-token)."""

    name: str
    fn: AuditFn
    expectation: Expectation
    family: str
    origin: str
    doc: str = ""
    topk_set: str = ""
    weighting: str = ""
    k: int | None = None
    teacher_temperature: float = 1.0

    @property
    def uses_outcomes(self) -> bool:
        """Built from the rollouts' outcomes, like ``P_succ``: the audit takes its plug-in cosine
        (as ``align_drgrpo``), whatever the run's alignment estimator."""
        return self.expectation == "rollouts"


def _t(temp: float) -> str:
    return f"T={temp:g}"


def _seq_sum(o: LossOptions, vocab: int) -> LossOptions:
    """Options that make a registered loss return ``Σ mask · L`` (the weights ride in the mask),
    with ``k`` capped at the vocabulary the loss sees (a node's S_u under the renormalised
    reading: a top-k set with k ≥ |S_u| is all of it)."""
    return replace(o, reduction="seq_sum", denominator=1.0, k=min(o.k, vocab))


def registry_loss(name: str, options: LossOptions, label: str | None = None) -> AuditedLoss:
    """The registered loss ``name`` with ``options``, evaluated by its own registry function."""
    spec = LOSSES[name]
    sampled = name == "sampled" or (name == "opd" and options.k == 0)

    def fn(z: Tensor, w: Tensor, tok: Tensor, weight: Tensor, reward: Tensor) -> Tensor:
        return spec.fn(z, w, tok, weight, _seq_sum(options, z.shape[-1])).loss

    k = options.k if ("k" in spec.uses or name == "opd") else (0 if name == "sampled" else None)
    return AuditedLoss(
        label or name,
        fn,
        "student" if sampled else "none",
        name,
        spec.origin,
        spec.doc,
        topk_set=options.topk_set if name == "opd" and options.k > 0 else "",
        weighting=options.topk_weight if name == "opd" and options.k > 0 else "",
        k=k,
        teacher_temperature=options.teacher_temperature,
    )


def _log_p_token(z: Tensor, tok: Tensor) -> Tensor:
    return log_probs(z).gather(-1, tok.long().unsqueeze(-1)).squeeze(-1)


def _ratio(z: Tensor, w: Tensor, tok: Tensor) -> Tensor:
    """``ℓ(y) = log p(y) − log q(y)`` of each entry's token (differentiable in ``z``)."""
    idx = tok.long().unsqueeze(-1)
    return (log_probs(z).gather(-1, idx) - log_probs(w.detach()).gather(-1, idx)).squeeze(-1)


def _kl_estimator(which: int, ell: Tensor) -> Tensor:
    """Schulman's estimators of ``KL(p‖q)`` from ``ℓ = log p(y) − log q(y)``, ``y ~ p``: k1 = ℓ,
    k2 = ℓ² / 2, k3 = (e^{−ℓ} − 1) + ℓ."""
    if which == 1:
        return ell
    if which == 2:
        return 0.5 * ell**2
    return torch.expm1(-ell) + ell


def kl_estimator_loss(which: int, as_reward: bool) -> AuditedLoss:
    """k1 / k2 / k3 as a per-token reward (REINFORCE, ``L = sg[k(y)] · log p(y)``, reward
    ``−k(y)``, no baseline) or differentiated directly as a loss (``L = k(y)``, e.g. GRPO's k3 KL
    penalty)."""

    def fn(z: Tensor, w: Tensor, tok: Tensor, weight: Tensor, reward: Tensor) -> Tensor:
        est = _kl_estimator(which, _ratio(z, w, tok))
        per = est.detach() * _log_p_token(z, tok) if as_reward else est
        return (weight * per).sum()

    kind = "reward" if as_reward else "loss"
    doc = (
        f"k{which} KL estimator as the per-token reward -k{which}(y) (REINFORCE, no baseline)"
        if as_reward
        else f"k{which} KL estimator differentiated as a loss at the sampled token"
    )
    return AuditedLoss(f"k{which}_{kind}", fn, "student", f"k_{kind}", "comparison", doc, k=0)


def _outcome_term(z: Tensor, tok: Tensor, weight: Tensor, reward: Tensor) -> Tensor:
    """``−Σ weight · sg[A] · log p(y)``: the policy-gradient loss of an advantage ``A``."""
    return -(weight * reward.detach() * _log_p_token(z, tok)).sum()


def drgrpo_loss() -> AuditedLoss:
    """Dr. GRPO at a node: ``L = −(r − b) log p(y)`` (no length or std normalisation)."""

    def fn(z: Tensor, w: Tensor, tok: Tensor, weight: Tensor, reward: Tensor) -> Tensor:
        return _outcome_term(z, tok, weight, reward)

    return AuditedLoss(
        "drgrpo", fn, "rollouts", "drgrpo", "comparison", "Dr. GRPO: -(r - b) log p(y), the outcome advantage"
    )


def minillm_loss() -> AuditedLoss:
    """MiniLLM at a node: the exact single-step reverse KL plus REINFORCE on the reward-to-go
    ``R_{u+1}`` of the path's token: ``L = KL(p‖q) − sg[R] · log p(y_u)``."""

    def fn(z: Tensor, w: Tensor, tok: Tensor, weight: Tensor, reward: Tensor) -> Tensor:
        single = full_rkl(z, w, weight, reduction="seq_sum", denominator=1.0).loss
        return single + _outcome_term(z, tok, weight, reward)

    return AuditedLoss(
        "minillm", fn, "path", "minillm", "comparison", "MiniLLM: single-step KL + reward-to-go of the path's token"
    )


def with_outcome(loss: AuditedLoss, lam: float, name: str | None = None) -> AuditedLoss:
    """``loss`` with the outcome (GRPO) advantage added to its reward, as the authors' code and
    the trainer's ``outcome_weight`` do: ``L + λ · (−(r − b) log p(y))``, averaged over the
    node's rollouts."""

    def fn(z: Tensor, w: Tensor, tok: Tensor, weight: Tensor, reward: Tensor) -> Tensor:
        return loss.fn(z, w, tok, weight, reward) + lam * _outcome_term(z, tok, weight, reward)

    return replace(
        loss,
        name=name or f"{loss.name}+outcome[lambda={lam:g}]",
        fn=fn,
        expectation="rollouts",
        family=f"{loss.family}+outcome",
        doc=f"{loss.doc}; plus {lam:g} x the outcome advantage",
    )


def mixture_loss(lam: float, k: int, topk_set: str = "student", weighting: str = "student") -> AuditedLoss:
    """The authors' OPD with the outcome advantage added to the distillation reward."""
    opts = LossOptions(k=k, topk_set=topk_set, topk_weight=weighting)  # type: ignore[arg-type]
    label = f"opd+outcome[{topk_set},{weighting},k={k},lambda={lam:g}]" if k else f"opd+outcome[k=0,lambda={lam:g}]"
    return with_outcome(registry_loss("opd", opts), lam, label)


def default_losses(
    ks: Sequence[int] = KS, teacher_temperatures: Sequence[float] = TEACHER_TEMPERATURES
) -> list[AuditedLoss]:
    """Every loss audited out of the box (see the module docstring), in a fixed order."""
    out: list[AuditedLoss] = []
    for temp in teacher_temperatures:
        base = LossOptions(teacher_temperature=temp)
        for k in ks:
            if k == 0:
                out.append(registry_loss("opd", replace(base, k=0), f"opd[k=0,{_t(temp)}]"))
                continue
            for s in TOPK_SETS:
                for wm in WEIGHT_MODES:
                    opts = replace(base, k=k, topk_set=s, topk_weight=wm)  # type: ignore[arg-type]
                    out.append(registry_loss("opd", opts, f"opd[{s},{wm},k={k},{_t(temp)}]"))
        out.append(registry_loss("sampled", base, f"sampled[{_t(temp)}]"))
        out.append(registry_loss("full", base, f"full[{_t(temp)}]"))
        out.append(registry_loss("forward_kl", base, f"forward_kl[{_t(temp)}]"))
        for beta in JSD_BETAS:
            out.append(registry_loss("jsd", replace(base, beta=beta), f"jsd[beta={beta:g},{_t(temp)}]"))
        for name in ("topk_renorm", "topk_partial", "topk_tail"):
            for k in ks:
                if k > 0:
                    out.append(registry_loss(name, replace(base, k=k), f"{name}[k={k},{_t(temp)}]"))
    for which in (1, 2, 3):
        out.append(kl_estimator_loss(which, as_reward=True))
    for which in (1, 2, 3):
        out.append(kl_estimator_loss(which, as_reward=False))
    out.append(minillm_loss())
    out.append(drgrpo_loss())
    for lam in MIX_LAMBDAS:
        out.append(mixture_loss(lam, 0))
        out.append(mixture_loss(lam, 16))
    return out


def user_loss(spec: str) -> AuditedLoss:
    """A user's loss from ``module:function`` (or ``path/to/file.py:function``) with the
    signature of the module docstring, audited as a sampled-token loss."""
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise OpdlensError(f"--loss {spec!r}: give it as module:function (or path/to/file.py:function)")
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise OpdlensError(f"--loss {spec!r}: no file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"opdlens_user_loss_{path.stem}", path)
            if mod_spec is None or mod_spec.loader is None:
                raise OpdlensError(f"--loss {spec!r}: cannot import {path}")
            mod = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except ImportError as exc:
        raise OpdlensError(f"--loss {spec!r}: cannot import {module!r} ({exc}); is it on PYTHONPATH?") from exc
    user = getattr(mod, attr, None)
    if not callable(user):
        raise OpdlensError(f"--loss {spec!r}: {module!r} has no function {attr!r}")

    def fn(z: Tensor, w: Tensor, tok: Tensor, weight: Tensor, reward: Tensor) -> Tensor:
        per = user(z, w, tok, torch.ones_like(weight))
        if not isinstance(per, Tensor) or per.shape != weight.shape:
            shape = tuple(per.shape) if isinstance(per, Tensor) else type(per).__name__
            raise OpdlensError(
                f"--loss {spec!r} returned {shape}; it must return the per-token loss [B, T] = {tuple(weight.shape)}"
            )
        return (weight * per).sum()

    doc = (user.__doc__ or "").strip().splitlines()[0] if user.__doc__ else "user loss"
    return AuditedLoss(spec, fn, "student", "user", "user", doc)


def select_losses(patterns: Iterable[str] = (), user: Iterable[str] = ()) -> list[AuditedLoss]:
    """The default losses whose name matches one of ``patterns`` (shell globs, e.g. ``opd[*k=16*``,
    ``full*``; none: all), then the user losses ``module:function``. A pattern that matches
    nothing is an error naming a few of the losses."""
    pats = [p for p in patterns if p]
    losses = default_losses()
    chosen = losses if not pats else []
    for p in pats:
        glob = p.replace("[", "[[]")  # only * and ? are wildcards: the names hold brackets
        hit = [x for x in losses if fnmatch.fnmatchcase(x.name, glob)]
        if not hit:
            some = ", ".join(x.name for x in losses[:: max(1, len(losses) // 12)])
            raise OpdlensError(f"--losses {p!r} matches no audited loss (they are named like: {some})")
        chosen += [x for x in hit if x not in chosen]
    chosen += [user_loss(u) for u in user]
    names = [x.name for x in chosen]
    if len(set(names)) != len(names):
        raise OpdlensError(f"audited loss names must be unique, got {names}")
    return chosen
