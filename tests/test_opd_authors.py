"""The authors' top-k OPD and metrics (paper B's code) against formulas derived independently:
per-token loops over Python sets, closed-form gradients, autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opdlens.opd import losses as L
from opdlens.opd.metrics import mechanism_metrics, token_metrics

B, T, V, K = 2, 4, 12, 4
SETS = ("student", "teacher", "intersection", "union", "symmetric_difference")


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    # teacher = perturbed student, more perturbed later: overlaps from full to empty
    w = z + torch.randn(B, T, V, generator=g, dtype=torch.float64) * torch.linspace(0.2, 6.0, T).view(1, T, 1)
    w[1, -1] = -z[1, -1]  # reversed ranking: an empty intersection
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, -1] = 0
    return z, w, tok, mask


def _sets(p: np.ndarray, q: np.ndarray, k: int) -> dict[str, list[int]]:
    s = [int(i) for i in np.argsort(-p, kind="stable")[:k]]
    t = [int(i) for i in np.argsort(-q, kind="stable")[:k]]
    return {
        "S": s,
        "T": t,
        "student": s,
        "teacher": t,
        "intersection": [v for v in s if v in t],
        "union": s + [v for v in t if v not in s],
        "symmetric_difference": [v for v in s if v not in t] + [v for v in t if v not in s],
    }


def _weights(ids: list[int], p: np.ndarray, q: np.ndarray, mode: str, normalise: bool) -> dict[int, float]:
    base = {v: {"student": p[v], "teacher": q[v], "uniform": 1.0}[mode] for v in ids}
    z = sum(base.values()) if normalise else 1.0
    return {v: b / z for v, b in base.items()}


def _reference(z, w, mask, k, topk_set, mode, tau_s=1.0, tau_t=1.0):
    """Token-mean surrogate loss, value and logit gradient from the formulas (float64 loops)."""
    n = float(mask.sum())
    grad = torch.zeros_like(z)
    values = []
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            if not mask[b, t]:
                continue
            p = torch.softmax(z[b, t] / tau_s, -1).numpy()
            q = torch.softmax(w[b, t] / tau_t, -1).numpy()
            ids = _sets(p, q, k)[topk_set]
            wt = _weights(ids, p, q, mode, normalise=topk_set != "symmetric_difference")
            c = {v: wt[v] * (math.log(p[v]) - math.log(q[v])) for v in ids}  # = -r_v
            values.append(sum(c.values()))
            g = -p * sum(c.values())
            for v, cv in c.items():
                g[v] += cv
            grad[b, t] = torch.from_numpy(g / tau_s) / n
    return float(np.sum(values) / n), grad


@pytest.mark.parametrize("topk_set", SETS)
@pytest.mark.parametrize("mode", ["student", "teacher", "uniform"])
def test_opd_topk_value_and_gradient_match_the_formulas(batch, topk_set, mode):
    z, w, tok, mask = batch
    x = z.clone().requires_grad_(True)
    out = L.opd_topk(
        x, w, tok, mask, k=K, topk_set=topk_set, weight=mode, student_temperature=1.3, teacher_temperature=0.7
    )
    out.loss.backward()
    value, grad = _reference(z, w, mask, K, topk_set, mode, tau_s=1.3, tau_t=0.7)
    assert out.value.item() == pytest.approx(value, rel=1e-4, abs=1e-6)
    assert torch.allclose(x.grad.double(), grad, atol=1e-6)


def test_full_support_is_the_reverse_kl_gradient(batch):
    z, w, tok, mask = batch
    a = z.clone().requires_grad_(True)
    L.opd_topk(a, w, tok, mask, k=V).loss.backward()
    b = z.clone().requires_grad_(True)
    L.full_rkl(b, w, mask).loss.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert b.grad.abs().max() > 1e-2


def test_k1_ours_is_zero_theirs_trains(batch):
    z, w, tok, mask = batch
    ours = z.clone().requires_grad_(True)
    out = L.topk_rkl(ours, w, mask, k=1, renormalize=True)
    out.loss.backward()
    assert out.value.item() == 0.0 and ours.grad.abs().max() == 0.0
    theirs = z.clone().requires_grad_(True)
    L.opd_topk(theirs, w, tok, mask, k=1).loss.backward()
    # closed form: l(v1) (e_v1 - p) per token, token-mean
    lp, lq = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
    v1 = lp.argmax(-1, keepdim=True)
    ell = (lp - lq).gather(-1, v1)
    expect = ell * (torch.zeros_like(z).scatter(-1, v1, 1.0) - lp.exp()) * mask.unsqueeze(-1) / mask.sum()
    assert torch.allclose(theirs.grad, expect, atol=1e-8)
    assert theirs.grad.abs().max() > 1e-2


def test_k0_is_sampled_token_at_the_rollout_temperature(batch):
    z, w, tok, mask = batch
    a = L.opd_topk(z, w, tok, mask, k=0)
    b = L.sampled_token_rkl(z, w, tok, mask)
    assert a.loss.item() == pytest.approx(b.loss.item()) and a.value.item() == pytest.approx(b.value.item())
    c = L.opd_topk(z, w, tok, mask, k=0, student_temperature=2.0)
    d = L.sampled_token_rkl(z / 2.0, w, tok, mask)
    assert c.loss.item() == pytest.approx(d.loss.item())


def test_tail_bucket_is_a_true_lower_bound(batch):
    z, w, tok, mask = batch
    full = L.full_rkl(z, w, mask).per_token
    for k in (1, 3, V):
        tail = L.topk_rkl(z, w, mask, k=k, tail=True).per_token
        assert torch.all(tail >= -1e-6) and torch.all(tail <= full + 1e-5), k  # float32 arithmetic
        # coarse-grained KL, directly
        for b in range(B):
            for t in range(T):
                if not mask[b, t]:
                    continue
                p, q = torch.softmax(z[b, t], -1).numpy(), torch.softmax(w[b, t], -1).numpy()
                s = np.argsort(-p)[:k]
                pp = np.append(p[s], max(1 - p[s].sum(), 1e-300))
                qq = np.append(q[s], max(1 - q[s].sum(), 1e-300))
                ref = float(np.sum(pp * np.log(pp / qq))) if k < V else float(np.sum(p * np.log(p / q)))
                assert tail[b, t].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert torch.allclose(L.topk_rkl(z, w, mask, k=V, tail=True).per_token, full, atol=1e-6)
    x = z.clone().requires_grad_(True)
    L.topk_rkl(x, w, mask, k=1, tail=True).loss.backward()
    assert x.grad.abs().max() > 1e-2  # trains at k = 1


def test_authors_metrics_match_direct_loops(batch):
    z, w, tok, mask = batch
    m = mechanism_metrics(z, w, k=K).summary(mask)
    ours = token_metrics(z, w, k=K).summary(mask)
    rows = {"ov": [], "ps": [], "qs": [], "adv_i": [], "adv_s": [], "ps_s": [], "qs_t": []}
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            p, q = torch.softmax(z[b, t], -1).numpy(), torch.softmax(w[b, t], -1).numpy()
            s = _sets(p, q, K)
            inter = s["intersection"]
            wt = _weights(s["S"], p, q, "student", True)  # training weights: student top-k, p/P(S)
            rows["ov"].append(len(inter) / K)
            if inter:
                rows["ps"].append(sum(p[v] for v in inter))
                rows["qs"].append(sum(q[v] for v in inter))
            rows["adv_i"] += [-wt[v] * math.log(p[v] / q[v]) for v in inter]
            only_s = [v for v in s["S"] if v not in s["T"]]
            only_t = [v for v in s["T"] if v not in s["S"]]
            rows["adv_s"] += [-wt[v] * math.log(p[v] / q[v]) for v in only_s]
            if only_s:
                rows["ps_s"].append(sum(p[v] for v in only_s))
            if only_t:
                rows["qs_t"].append(sum(q[v] for v in only_t))
    assert min(rows["ov"]) == 0.0 and max(rows["ov"]) == 1.0  # covers an empty and a full intersection
    for key, name in (
        ("ov", "overlap_ratio"),
        ("ps", "student_p_sum_intersection"),
        ("qs", "teacher_p_sum_intersection"),
        ("adv_i", "adv_intersection"),
        ("adv_s", "adv_only_stu"),
        ("ps_s", "student_p_sum_only_stu"),
        ("qs_t", "teacher_p_sum_only_tch"),
    ):
        assert m[name] == pytest.approx(float(np.mean(rows[key])), rel=1e-5, abs=1e-7), name
    # the student set's advantage tensor has no teacher side: the authors log no adv_only_tch
    assert math.isnan(m["adv_only_tch"])
    # theirs skips empty intersections, ours counts them as 0: they differ on this batch
    assert ours["student_shared_mass"] < m["student_p_sum_intersection"]


def test_gradient_split_matches_autograd(batch):
    z, w, tok, mask = batch
    m = mechanism_metrics(z, w, k=K, student_temperature=1.3).summary(mask)
    norms = {}
    for name, sel in (
        ("grad_norm_intersection", lambda e: e.shared),
        ("grad_norm_non_intersection", lambda e: ~e.shared),
    ):
        x = z.clone().requires_grad_(True)
        L.opd_topk(x, w, tok, mask, k=K, student_temperature=1.3, entry_mask=sel).loss.backward()
        norms[name] = float(x.grad.norm())
        assert m[name] == pytest.approx(norms[name], rel=1e-5), name
    # the two parts add up to the whole gradient
    x = z.clone().requires_grad_(True)
    L.opd_topk(x, w, tok, mask, k=K, student_temperature=1.3).loss.backward()
    assert float(x.grad.norm()) <= norms["grad_norm_intersection"] + norms["grad_norm_non_intersection"] + 1e-9
    assert 0 < m["adv_abs_share_intersection"] < 1


def test_overlap_only_loss_is_the_intersection_set(batch):
    z, w, tok, mask = batch
    a = z.clone().requires_grad_(True)
    L.opd_topk(a, w, tok, mask, k=K, topk_set="intersection").loss.backward()
    # no gradient at the position whose intersection is empty
    assert a.grad[1, -1].abs().max() == 0.0 and a.grad[0, 0].abs().max() > 0


# ---------------------------------------------------------------------------- the authors' metric definitions
def _authors_metrics(z, w, mask, k, strategy, mode, tau_s, tau_t):
    """The authors' per-strategy advantage tensor and logged means, rebuilt per token from their
    definitions (thunlp/OPD 0a44395: ``compute_distillation_reward`` in ``dp_actor.py`` builds the
    tensor, the metric block of ``ray_trainer.py`` averages it), with python lists and sets.

    Returns the three advantage means and the logit-gradient norm of the shared / other part."""
    cats = {"inter": [], "only_stu": [], "only_tch": []}
    n = float(mask.sum())
    g_shared = torch.zeros_like(z)
    g_other = torch.zeros_like(z)
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            if not mask[b, t]:
                continue
            p = torch.softmax(z[b, t] / tau_s, -1).numpy()
            q = torch.softmax(w[b, t] / tau_t, -1).numpy()
            s_ids = [int(i) for i in np.argsort(-p, kind="stable")[:k]]
            t_ids = [int(i) for i in np.argsort(-q, kind="stable")[:k]]
            s_in_t = [v in t_ids for v in s_ids]
            t_in_s = [v in s_ids for v in t_ids]
            # their tensor: which ids it holds, and which entries are valid (trained)
            if strategy in ("student", "intersection"):
                ids, valid = s_ids, ([True] * k if strategy == "student" else s_in_t)
            elif strategy == "teacher":
                ids, valid = t_ids, [True] * k
            elif strategy == "union":
                ids, valid = s_ids + t_ids, [True] * k + [not x for x in t_in_s]
            else:  # union-intersection
                ids, valid = s_ids + t_ids, [not x for x in s_in_t] + [not x for x in t_in_s]
            base = [{"student": p[v], "teacher": q[v], "uniform": 1.0}[mode] for v in ids]
            z_norm = sum(bv for bv, ok in zip(base, valid) if ok) if strategy != "symmetric_difference" else 1.0
            weight = [bv / z_norm if ok else 0.0 for bv, ok in zip(base, valid)]
            adv = [-wt * math.log(p[v] / q[v]) if ok else 0.0 for v, wt, ok in zip(ids, weight, valid)]
            # which entries each logged mean averages, per their strategy branch
            if strategy == "teacher":
                inter = [i for i in range(k) if t_in_s[i]]
                only_s, only_t = [], [i for i in range(k) if not t_in_s[i]]
            else:
                inter = [i for i in range(k) if s_in_t[i]]
                only_s = [i for i in range(k) if not s_in_t[i]]
                only_t = [k + i for i in range(k) if not t_in_s[i]] if len(ids) == 2 * k else []
            cats["inter"] += [adv[i] for i in inter]
            cats["only_stu"] += [adv[i] for i in only_s]
            cats["only_tch"] += [adv[i] for i in only_t]
            # logit gradient of the token-mean loss -sum_v adv_v log p(v), split by shared ids
            is_shared = [v in s_ids and v in t_ids for v in ids]
            for i, v in enumerate(ids):
                if not valid[i]:
                    continue
                c = -adv[i]  # = w_v l(v)
                g = -c * p
                g[v] += c
                target = g_shared if is_shared[i] else g_other
                target[b, t] += torch.from_numpy(g / tau_s) / n
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {
        "adv_intersection": mean(cats["inter"]),
        "adv_only_stu": mean(cats["only_stu"]),
        "adv_only_tch": mean(cats["only_tch"]),
        "grad_norm_intersection": float(g_shared.norm()),
        "grad_norm_non_intersection": float(g_other.norm()),
    }


@pytest.mark.parametrize("topk_set", SETS)
@pytest.mark.parametrize("mode", ["student", "teacher"])
def test_set_metrics_follow_the_authors_definitions(batch, topk_set, mode):
    z, w, tok, mask = batch
    m = mechanism_metrics(
        z, w, k=K, topk_set=topk_set, weight=mode, student_temperature=1.3, teacher_temperature=0.8
    ).summary(mask)
    ref = _authors_metrics(z, w, mask, K, topk_set, mode, 1.3, 0.8)
    for name, want in ref.items():
        if math.isnan(want):
            assert math.isnan(m[name]), (name, m[name])
        else:
            assert m[name] == pytest.approx(want, rel=1e-5, abs=1e-9), name


def test_untrained_entries_log_zero_advantage_and_the_teacher_set_its_shared_gradient(batch):
    z, w, tok, mask = batch
    inter = mechanism_metrics(z, w, k=K, topk_set="intersection").summary(mask)
    assert inter["adv_only_stu"] == 0.0  # student-only ids are outside the overlap-only set
    assert inter["adv_intersection"] != 0.0
    sd = mechanism_metrics(z, w, k=K, topk_set="symmetric_difference")
    assert sd.summary(mask)["adv_intersection"] == 0.0
    from opdlens.opd.metrics import chunk_sums

    curves = chunk_sums(sd, mask, 2)
    inter_chunks = [v for key, v in curves.items() if key.startswith("adv_intersection_chunk")]
    assert inter_chunks and all(num == 0.0 and den > 0 for num, den in inter_chunks)
    teacher = mechanism_metrics(z, w, k=K, topk_set="teacher").summary(mask)
    assert teacher["grad_norm_intersection"] > 1e-3 and teacher["adv_abs_share_intersection"] > 0
    # the shared part is what the teacher set's loss restricted to shared ids computes (autograd)
    x = z.clone().requires_grad_(True)
    L.opd_topk(x, w, tok, mask, k=K, topk_set="teacher", entry_mask=lambda e: e.shared).loss.backward()
    assert teacher["grad_norm_intersection"] == pytest.approx(float(x.grad.norm()), rel=1e-5)


def test_student_entropy_is_at_the_rollout_temperature(batch):
    from opdlens.opd.config import TrainConfig
    from opdlens.opd.runlog import MetricSums
    from opdlens.opd.scoring import Scored
    from opdlens.opd.step import add_signals

    z, w, tok, mask = batch
    tau = 1.7
    want = []
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                p = torch.softmax(z[b, t] / tau, -1).numpy()
                want.append(float(-(p * np.log(p)).sum()))
    m = token_metrics(z, w, k=K, student_temperature=tau).summary(mask)
    assert m["student_entropy"] == pytest.approx(float(np.mean(want)), rel=1e-6)
    assert token_metrics(z, w, k=K).summary(mask)["student_entropy"] < m["student_entropy"] - 0.05
    # the step logs it at the run's temperature
    sums = MetricSums()
    cfg = TrainConfig(temperature=tau, k=K, metrics_k=K)
    add_signals(sums, Scored(z.float(), w.float(), tok, mask.float()), cfg)
    assert sums.means()["student_entropy"] == pytest.approx(float(np.mean(want)), rel=1e-5)
