"""OPD monitoring metrics vs direct per-position computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opdlens.errors import OpdlensError
from opdlens.opd.metrics import token_metrics


def _direct(p: np.ndarray, q: np.ndarray, k: int) -> dict[str, float]:
    sp = set(np.argsort(-p)[:k].tolist())
    sq = set(np.argsort(-q)[:k].tolist())
    inter = sorted(sp & sq)
    P = sum(p[v] for v in inter)
    Q = sum(q[v] for v in inter)
    adv = sum(p[v] * (math.log(q[v]) - math.log(p[v])) for v in inter) / P if inter else float("nan")
    hp = -sum(x * math.log(x) for x in p)
    hq = -sum(x * math.log(x) for x in q)
    return dict(
        overlap_ratio=len(inter) / k,
        student_shared_mass=P,
        teacher_shared_mass=Q,
        overlap_advantage=adv,
        entropy_gap=hq - hp,
        rkl=sum(p[i] * math.log(p[i] / q[i]) for i in range(len(p))),
        top1_agree=float(np.argmax(p) == np.argmax(q)),
    )


def test_metrics_match_direct_loops():
    g = torch.Generator().manual_seed(1)
    B, T, V, k = 2, 6, 20, 5
    z = torch.randn(B, T, V, generator=g) * 2
    # teacher: a perturbation of the student, so overlaps are partial and vary
    w = z + torch.randn(B, T, V, generator=g) * torch.linspace(0.1, 3.0, T).view(1, T, 1)
    tok = torch.randint(0, V, (B, T), generator=g)
    m = token_metrics(z, w, k=k, tokens=tok)
    ratios = []
    for b in range(B):
        for t in range(T):
            p = torch.softmax(z[b, t].double(), -1).numpy()
            q = torch.softmax(w[b, t].double(), -1).numpy()
            d = _direct(p, q, k)
            ratios.append(d["overlap_ratio"])
            for key, val in d.items():
                got = getattr(m, key)[b, t].item()
                if math.isnan(val):
                    assert math.isnan(got)
                else:
                    assert got == pytest.approx(val, rel=1e-4, abs=1e-5), (key, b, t)
            assert m.sampled_log_ratio[b, t].item() == pytest.approx(
                math.log(p[tok[b, t]]) - math.log(q[tok[b, t]]), rel=1e-4, abs=1e-5
            )
    assert 0.0 < min(ratios) < 1.0 and max(ratios) == 1.0  # the test covers partial and full overlap


def test_identical_and_disjoint_extremes():
    z = torch.tensor([[[4.0, 3.0, 2.0, -5.0, -6.0, -7.0]]])
    m = token_metrics(z, z.clone(), k=3)
    assert m.overlap_ratio.item() == 1.0
    assert m.overlap_advantage.item() == pytest.approx(0.0, abs=1e-6)
    assert m.entropy_gap.item() == pytest.approx(0.0, abs=1e-6)
    assert m.student_shared_mass.item() == pytest.approx(float(torch.softmax(z, -1)[0, 0, :3].sum()))
    rev = z.flip(-1)
    m2 = token_metrics(z, rev, k=3)
    assert m2.overlap_ratio.item() == 0.0
    assert math.isnan(m2.overlap_advantage.item())
    assert m2.student_shared_mass.item() == 0.0
    s = m2.summary(torch.ones(1, 1))
    assert math.isnan(s["overlap_advantage"]) and s["overlap_ratio"] == 0.0


def test_summary_is_masked_mean():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 10, generator=g)
    w = torch.randn(2, 4, 10, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    m = token_metrics(z, w, k=3)
    s = m.summary(mask)
    sel = mask.bool()
    assert s["rkl"] == pytest.approx(float(m.rkl[sel].mean()), rel=1e-6)
    assert s["entropy_gap"] == pytest.approx(float(m.entropy_gap[sel].mean()), rel=1e-6)
    assert s["rkl"] != pytest.approx(float(m.rkl.mean()), rel=1e-3)  # mask matters


def test_shape_errors():
    with pytest.raises(OpdlensError, match="same shape"):
        token_metrics(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6))
    with pytest.raises(OpdlensError, match="k=9"):
        token_metrics(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), k=9)
