"""OPD losses: direct per-token loops, autograd vs analytic gradients, independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opdlens.errors import OpdlensError
from opdlens.opd import losses as L
from opdlens.opd import registry as R

B, T, V = 3, 5, 11


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64).float() * 2.0
    w = torch.randn(B, T, V, generator=g).float() * 2.0
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return z, w, tok, mask


def _loop_kl(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum(a[i] * (math.log(a[i]) - math.log(b[i])) for i in range(len(a))))


def _softmax(x: torch.Tensor) -> np.ndarray:
    return torch.softmax(x.double(), -1).numpy()


def test_full_rkl_matches_loop_and_kl_div(batch):
    z, w, tok, mask = batch
    out = L.full_rkl(z, w, mask, reduction="token_mean")
    vals, ref_kl_div = [], []
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                p, q = _softmax(z[b, t]), _softmax(w[b, t])
                vals.append(_loop_kl(p, q))
                # independent implementation: F.kl_div(input=log q, target=log p) = KL(p || q)
                ref_kl_div.append(
                    float(
                        F.kl_div(
                            torch.log_softmax(w[b, t].double(), -1),
                            torch.log_softmax(z[b, t].double(), -1),
                            reduction="sum",
                            log_target=True,
                        )
                    )
                )
                assert out.per_token[b, t].item() == pytest.approx(vals[-1], rel=1e-5, abs=1e-6)
            else:
                assert out.per_token[b, t].item() == 0.0
    assert out.loss.item() == pytest.approx(np.mean(vals), rel=1e-5)
    assert np.allclose(vals, ref_kl_div, rtol=1e-6)
    assert min(vals) > 0.05  # a real, non-trivial divergence


def test_forward_kl_and_scipy_entropy(batch):
    from scipy.stats import entropy

    z, w, tok, mask = batch
    out = L.forward_kl(z, w, mask, reduction="seq_sum")
    per_seq = []
    for b in range(B):
        s = 0.0
        for t in range(T):
            if mask[b, t]:
                s += float(entropy(_softmax(w[b, t]), _softmax(z[b, t])))  # KL(q || p), scipy
        per_seq.append(s)
    assert out.loss.item() == pytest.approx(np.mean(per_seq), rel=1e-5)


def test_full_rkl_gradient_is_p_times_centred_log_ratio(batch):
    z, w, tok, mask = batch
    z = z.clone().requires_grad_(True)
    out = L.full_rkl(z, w, mask, reduction="seq_sum")
    out.loss.backward()
    logp = torch.log_softmax(z.detach().double(), -1)
    logq = torch.log_softmax(w.double(), -1)
    p = logp.exp()
    ell = logp - logq
    ell_bar = (p * ell).sum(-1, keepdim=True)
    analytic = p * (ell - ell_bar) * mask.double().unsqueeze(-1) / B
    assert torch.allclose(z.grad.double(), analytic, atol=1e-6)
    assert analytic.abs().max() > 1e-2
    assert torch.all(z.grad[2, 1:] == 0)  # masked positions get no gradient


def test_forward_kl_gradient_is_p_minus_q(batch):
    z, w, tok, mask = batch
    z = z.clone().requires_grad_(True)
    L.forward_kl(z, w, mask, reduction="seq_sum").loss.backward()
    expected = (torch.softmax(z.detach(), -1) - torch.softmax(w, -1)) * mask.unsqueeze(-1) / B
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_sampled_token_surrogate_and_value(batch):
    z, w, tok, mask = batch
    out = L.sampled_token_rkl(z, w, tok, mask, reduction="token_mean")
    n = mask.sum().item()
    vals, surr = [], []
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                lp = float(torch.log_softmax(z[b, t].double(), -1)[tok[b, t]])
                lq = float(torch.log_softmax(w[b, t].double(), -1)[tok[b, t]])
                vals.append(lp - lq)
                surr.append((lp - lq) * lp)
    assert out.value.item() == pytest.approx(sum(vals) / n, rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(surr) / n, rel=1e-5)


def test_sampled_token_gradient_is_unbiased_for_full_rkl():
    """E_{y~p}[grad of the sampled-token surrogate] == grad of the full reverse KL (exact enumeration)."""
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(1, 1, 7, generator=g)
    w = torch.randn(1, 1, 7, generator=g)
    mask = torch.ones(1, 1)
    p = torch.softmax(z0, -1)[0, 0]
    expected_grad = torch.zeros_like(z0)
    for y in range(7):
        z = z0.clone().requires_grad_(True)
        L.sampled_token_rkl(z, w, torch.tensor([[y]]), mask).loss.backward()
        expected_grad += p[y] * z.grad
    z = z0.clone().requires_grad_(True)
    L.full_rkl(z, w, mask).loss.backward()
    assert torch.allclose(expected_grad, z.grad, atol=1e-6)
    assert z.grad.abs().max() > 1e-2
    # and a single sample is NOT the full gradient (it is an estimator)
    z = z0.clone().requires_grad_(True)
    L.sampled_token_rkl(z, w, torch.tensor([[0]]), mask).loss.backward()
    assert not torch.allclose(z.grad, expected_grad, atol=1e-3)


@pytest.mark.parametrize("renormalize", [False, True])
def test_topk_rkl_matches_loop(batch, renormalize):
    z, w, tok, mask = batch
    k = 4
    out = L.topk_rkl(z, w, mask, k=k, renormalize=renormalize, reduction="seq_mean")
    per_seq = []
    for b in range(B):
        vals = []
        for t in range(T):
            if not mask[b, t]:
                continue
            p, q = _softmax(z[b, t]), _softmax(w[b, t])
            s = np.argsort(-p)[:k]
            ps, qs = p[s], q[s]
            if renormalize:
                ps, qs = ps / ps.sum(), qs / qs.sum()
            vals.append(float(np.sum(ps * (np.log(ps) - np.log(qs)))))
        per_seq.append(np.mean(vals))
    assert out.loss.item() == pytest.approx(np.mean(per_seq), rel=1e-5)


def test_topk_with_k_equal_vocab_is_full(batch):
    z, w, tok, mask = batch
    a = L.topk_rkl(z, w, mask, k=V).loss
    c = L.topk_rkl(z, w, mask, k=V, renormalize=True).loss
    b = L.full_rkl(z, w, mask).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert c.item() == pytest.approx(b.item(), rel=1e-5)


def test_topk_gradient_matches_finite_differences(batch):
    z, w, tok, mask = batch
    z = z[:1, :1].double().clone().requires_grad_(True)
    w = w[:1, :1].double()
    m = torch.ones(1, 1)

    def f(x: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(x, -1)
        lq = torch.log_softmax(w, -1)
        idx = lp.detach().topk(4, dim=-1).indices
        a, b = lp.gather(-1, idx), lq.gather(-1, idx)
        a = a - torch.logsumexp(a, -1, keepdim=True)
        b = b - torch.logsumexp(b, -1, keepdim=True)
        return (a.exp() * (a - b)).sum()

    L.topk_rkl(z, w, m, k=4, renormalize=True).loss.backward()
    eps = 1e-6
    num = torch.zeros_like(z)
    for j in range(V):
        d = torch.zeros_like(z)
        d[0, 0, j] = eps
        num[0, 0, j] = (f(z.detach() + d) - f(z.detach() - d)) / (2 * eps)
    assert torch.allclose(z.grad.double(), num, atol=1e-5)


def test_generalized_jsd_against_scipy_and_kl_div(batch):
    from scipy.spatial.distance import jensenshannon

    z, w, tok, mask = batch
    out = L.generalized_jsd(z, w, mask, beta=0.5, reduction="token_mean")
    ref = []
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                # scipy returns sqrt(JSD) (natural log by default)
                ref.append(jensenshannon(_softmax(z[b, t]), _softmax(w[b, t])) ** 2)
    assert out.loss.item() == pytest.approx(np.mean(ref), rel=1e-5)

    # general beta: re-derived GKD formula with F.kl_div (mixture m = beta q + (1-beta) p)
    beta = 0.3
    out = L.generalized_jsd(z, w, mask, beta=beta, reduction="token_mean")
    lp, lq = torch.log_softmax(z.double(), -1), torch.log_softmax(w.double(), -1)
    lm = torch.log(beta * lq.exp() + (1 - beta) * lp.exp())
    per = beta * F.kl_div(lm, lq, reduction="none", log_target=True).sum(-1) + (1 - beta) * F.kl_div(
        lm, lp, reduction="none", log_target=True
    ).sum(-1)
    assert out.loss.item() == pytest.approx(float((per * mask).sum() / mask.sum()), rel=1e-5)


def test_generalized_jsd_limits(batch):
    z, w, tok, mask = batch
    fkl = L.forward_kl(z, w, mask).loss.item()
    rkl = L.full_rkl(z, w, mask).loss.item()
    assert L.generalized_jsd(z, w, mask, beta=0.0).loss.item() == pytest.approx(fkl)
    assert L.generalized_jsd(z, w, mask, beta=1.0).loss.item() == pytest.approx(rkl)
    # the family is continuous at the ends once divided by beta (resp. 1 - beta)
    eps = 1e-4
    assert L.generalized_jsd(z, w, mask, beta=eps).loss.item() / eps == pytest.approx(fkl, rel=2e-2)
    assert L.generalized_jsd(z, w, mask, beta=1 - eps).loss.item() / eps == pytest.approx(rkl, rel=2e-2)


def test_generalized_jsd_gradient_matches_autograd_reference(batch):
    z, w, tok, mask = batch
    z1 = z.double().clone().requires_grad_(True)
    L.generalized_jsd(z1, w.double(), mask, beta=0.7, reduction="seq_sum").loss.backward()
    z2 = z.double().clone().requires_grad_(True)
    lp, lq = torch.log_softmax(z2, -1), torch.log_softmax(w.double(), -1)
    m = 0.7 * lq.exp() + 0.3 * lp.exp()
    per = 0.7 * (lq.exp() * (lq - m.log())).sum(-1) + 0.3 * (lp.exp() * (lp - m.log())).sum(-1)
    ((per * mask).sum() / B).backward()
    assert torch.allclose(z1.grad.double(), z2.grad, atol=1e-5)


def test_denominator_makes_micro_batches_add_up(batch):
    z, w, tok, mask = batch
    for name in ("opd", "sampled", "topk_renorm", "topk_tail", "full", "jsd"):
        full = R.opd_loss(name, z, w, tok, mask, k=4, reduction="token_mean").loss
        n = mask.sum().item()
        parts = sum(
            R.opd_loss(
                name,
                z[i : i + 1],
                w[i : i + 1],
                tok[i : i + 1],
                mask[i : i + 1],
                k=4,
                reduction="token_mean",
                denominator=n,
            ).loss
            for i in range(B)
        )
        assert parts.item() == pytest.approx(full.item(), rel=1e-5)
        full_s = R.opd_loss(name, z, w, tok, mask, k=4, reduction="seq_sum").loss
        parts_s = sum(
            R.opd_loss(
                name,
                z[i : i + 1],
                w[i : i + 1],
                tok[i : i + 1],
                mask[i : i + 1],
                k=4,
                reduction="seq_sum",
                denominator=B,
            ).loss
            for i in range(B)
        )
        assert parts_s.item() == pytest.approx(full_s.item(), rel=1e-5)


def test_identical_distributions_give_zero(batch):
    z, w, tok, mask = batch
    for name in R.LOSSES:
        out = R.opd_loss(name, z, z.clone(), tok, mask, k=4)
        assert abs(out.value.item()) < 1e-6, name


def test_errors_are_clear(batch):
    z, w, tok, mask = batch
    with pytest.raises(OpdlensError, match="same positions"):
        L.full_rkl(z, w[:, :2], mask)
    with pytest.raises(OpdlensError, match="k=99"):
        L.topk_rkl(z, w, mask, k=99)
    with pytest.raises(OpdlensError, match="unknown OPD loss 'nope'.*choose one of opd, sampled"):
        R.opd_loss("nope", z, w, tok, mask)
    with pytest.raises(OpdlensError, match="topk_renorm"):
        R.get_loss("topk")
    with pytest.raises(OpdlensError, match="beta"):
        L.generalized_jsd(z, w, mask, beta=1.5)


def test_teacher_temperature_divides_teacher_logits(batch):
    z, w, tok, mask = batch
    for name in R.LOSSES:
        a = R.opd_loss(name, z, w, tok, mask, k=4, teacher_temperature=0.5).value.item()
        b = R.opd_loss(name, z, w * 2.0, tok, mask, k=4).value.item()
        c = R.opd_loss(name, z, w, tok, mask, k=4).value.item()
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6) and a != pytest.approx(c, rel=1e-3), name
    with pytest.raises(OpdlensError, match="temperature"):
        L.full_rkl(z, w, mask, teacher_temperature=0.0)
