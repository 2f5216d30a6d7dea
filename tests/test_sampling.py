"""Truncated sampling (``top_p``, ``top_k``, ``min_p``; issue 27 item 4): the one definition against
a by-hand reference, the synthetic oracle's and the torch engine's sampled frequencies against the
truncated distribution (chi-square), the engine bit for bit against a reference sampler, and the
signals' P_θ (``signals.student_distribution``) against the DP oracle of the sampling policy."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.signals import SignalConfig, path_signals
from opdlens.diagnose.targeting import TargetingConfig
from opdlens.diagnose.tree import RolloutSet, path_stats
from opdlens.errors import OpdlensError
from opdlens.models import HFPolicy, tiny_random_policy
from opdlens.report.run import load_results
from opdlens.rollout import TorchEngine
from opdlens.sampling import LOG_ZERO, Truncation, sampling_log_probs, support_log_probs, truncate_log_probs
from opdlens.synthetic import SyntheticPolicy
from tests.helpers import SyntheticFactory

SETTINGS = [
    Truncation(top_p=0.8),
    Truncation(top_k=3),
    Truncation(min_p=0.2),
    Truncation(top_p=0.9, top_k=5, min_p=0.05),
    Truncation(top_p=0.5, min_p=0.1),
]


def _ref(p: list[float], t: Truncation) -> list[float]:
    """The truncated distribution by hand, in vLLM's order: min_p, top_k (ties kept), top_p on
    what is left, renormalised."""
    keep = list(range(len(p)))
    if t.min_p > 0:
        keep = [i for i in keep if p[i] >= t.min_p * max(p)]
    if t.top_k > 0:
        kth = sorted((p[i] for i in keep), reverse=True)[min(t.top_k, len(keep)) - 1]
        keep = [i for i in keep if p[i] >= kth]
    if t.top_p < 1:
        z = sum(p[i] for i in keep)
        kept, before = [], 0.0
        for i in sorted(keep, key=lambda i: -p[i]):
            if not kept or before < t.top_p:
                kept.append(i)
            before += p[i] / z
        keep = kept
    z = sum(p[i] for i in keep)
    return [p[i] / z if i in keep else 0.0 for i in range(len(p))]


@pytest.mark.parametrize("trunc", SETTINGS, ids=lambda t: t.describe())
def test_truncation_matches_the_by_hand_reference(trunc: Truncation) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 9, generator=g, dtype=torch.float64) * 1.5
    logits[:20, :3] = 0.7  # ties at the top
    got = truncate_log_probs(logits, trunc).exp()
    for row, out in zip(torch.softmax(logits, -1).tolist(), got.tolist()):
        assert out == pytest.approx(_ref(row, trunc), abs=1e-12)
    # ties with the k-th token are kept, as vLLM and Hugging Face keep them
    if trunc == Truncation(top_k=3):
        tied = torch.tensor([[1.0, 1.0, 0.5, 0.5, 0.5, -1.0]]).double()
        assert int((truncate_log_probs(tied, trunc) > -math.inf).sum()) == 5


def test_settings_are_checked_and_off_is_the_model() -> None:
    lp = torch.randn(3, 7).log_softmax(-1)
    assert torch.equal(truncate_log_probs(lp, Truncation()), lp.log_softmax(-1))
    assert Truncation().kwargs() == {} and Truncation(top_k=4).kwargs() == {"top_k": 4}
    for bad, msg in (({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k"), ({"min_p": 1.0}, "min_p")):
        with pytest.raises(OpdlensError, match=msg):
            Truncation(**bad)
    # a config refuses them with its own message
    with pytest.raises(OpdlensError, match="top_k"):
        _config_error({"top_k": -2})


def _config_error(raw: dict[str, Any]) -> None:
    from opdlens.config import validate_config

    validate_config(DiagnoseConfig, raw, "cfg.yaml")


# ------------------------------------------------------------------ sampled frequencies
def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token outside the truncated support was sampled"
    return float(stats.chisquare(counts[keep], probs[keep] / probs[keep].sum() * counts.sum()).pvalue)


@pytest.mark.parametrize("trunc", SETTINGS[1:4], ids=lambda t: t.describe())
def test_synthetic_sampler_frequencies_are_the_truncated_distribution(trunc: Truncation) -> None:
    pol = SyntheticPolicy.random(vocab_size=8, seed=4, scale=1.5)
    n, temp = 6000, 0.8
    comps = pol.sample([[]], n, 2, seed=1, temperature=temp, **trunc.kwargs())[0]
    exact = pol.sampling(temp, trunc)  # the policy the sampler draws from, with its own DP
    first = np.bincount([c.tokens[0] for c in comps], minlength=8)
    probs = exact.next_token_logprobs([[]])[0].double().exp().numpy()
    assert (probs == 0).sum() >= 1  # the truncation drops something here: the test has power
    assert _chi2(first, probs) > 1e-3
    full = pol.next_token_logprobs([[]])[0].double().exp().numpy()
    assert stats.chisquare(first, full * n).pvalue < 1e-6 or (first[full > 0] == 0).any()
    # the second token given the most frequent first one
    top = int(first.argmax())
    second = np.bincount([c.tokens[1] for c in comps if c.tokens[0] == top and len(c.tokens) > 1], minlength=8)
    assert _chi2(second, exact.next_token_logprobs([[top]])[0].double().exp().numpy()) > 1e-3
    # the recorded log-probs are the truncated distribution's
    for c in comps[:50]:
        rows = exact.continuation_logprobs([], c.tokens)
        assert c.logprobs == pytest.approx(rows[range(len(c.tokens)), c.tokens].tolist(), abs=1e-6)


@pytest.fixture(scope="module")
def llama() -> HFPolicy:
    return tiny_random_policy(seed=0, vocab_size=16, init_std=0.5)


def _engine(pol: HFPolicy, **kw: Any) -> TorchEngine:
    return TorchEngine(pol.model, pol.eos_token_ids, pol.pad_token_id, "cpu", **kw)


def test_engine_frequencies_and_logprobs_are_the_truncated_distribution(llama: HFPolicy) -> None:
    prefix, n, temp = [3, 1, 4, 1, 5], 3000, 0.9
    trunc = Truncation(top_p=0.85, top_k=6, min_p=0.02)
    (cs,) = _engine(llama, max_batch_rows=1024).sample([prefix], n, 3, seed=7, temperature=temp, **trunc.kwargs())
    ref = sampling_log_probs(llama.next_token_logprobs([prefix])[0].double(), temp, trunc).exp().numpy()
    assert (ref == 0).sum() >= 8
    assert _chi2(np.bincount([c.tokens[0] for c in cs], minlength=16), ref) > 1e-3
    # every step's recorded log-prob (decoded tokens too) is its token's truncated log-prob
    for c in cs[:200]:
        rows = sampling_log_probs(llama.continuation_logprobs(prefix, c.tokens).double(), temp, trunc)
        got = torch.tensor(c.logprobs, dtype=torch.float64)
        torch.testing.assert_close(got, rows[range(len(c.tokens)), c.tokens], atol=1e-5, rtol=0)


def test_engine_samples_equal_a_reference_truncated_sampler_bit_for_bit(llama: HFPolicy) -> None:
    """The engine's truncation path against a sampler that truncates by hand (:func:`_ref`) and
    draws the same Gumbel noise: the same tokens, the same log-probs."""
    trunc, temp = Truncation(top_p=0.9, top_k=8, min_p=0.01), 0.8

    def reference(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits.double() / temperature, -1).tolist()
        lp = torch.tensor([_ref(p, trunc) for p in probs], dtype=torch.float64).log().float()
        noise = torch.empty_like(lp).exponential_(generator=gen)
        tok = torch.argmax(lp - noise.log_(), dim=-1)
        return tok, lp.gather(1, tok[:, None])[:, 0]

    prefixes = [[1, 2, 3], [4, 5, 6, 7], [11]]
    eng = _engine(llama, sampler="torch")
    got = eng.sample(prefixes, 6, 8, seed=3, temperature=temp, **trunc.kwargs())
    ref_eng = _engine(llama, sampler="torch")
    ref_eng._sample = reference
    want = ref_eng.sample(prefixes, 6, 8, seed=3, temperature=temp)
    assert [[c.tokens for c in cs] for cs in got] == [[c.tokens for c in cs] for cs in want]
    for a, b in zip(sum(got, []), sum(want, [])):
        assert a.logprobs == pytest.approx(b.logprobs, abs=2e-6)
    assert sum(len(c.tokens) for c in sum(got, [])) > 40


# ------------------------------------------------------------------ P_θ of the signals
def test_support_log_probs_are_the_sampling_policy_with_finite_zeros() -> None:
    pol = SyntheticPolicy.random(vocab_size=7, seed=2, scale=1.5)
    trunc, temp = Truncation(top_k=3, top_p=0.9), 0.7
    path = [int(t) for t in pol.sample([[]], 1, 6, seed=0, temperature=temp, **trunc.kwargs())[0][0].tokens]
    got = support_log_probs(pol.continuation_logprobs([], path), temp, trunc)
    want = pol.sampling(temp, trunc).continuation_logprobs([], path)
    assert torch.equal(torch.isinf(want), got == LOG_ZERO)
    torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)], atol=1e-6, rtol=0)
    assert support_log_probs(want, 1.0, Truncation()) is want  # nothing to do: the same tensor


def test_signals_take_p_theta_from_the_sampling_distribution_against_the_dp_oracle() -> None:
    """A tree sampled at T = 0.7 with top-k 3: P̄ estimates the sampling policy's exact success, and
    with ``student_distribution: sampling`` the ideal gradient is that policy's (a token outside
    the support contributes 0, never NaN); ``model`` differentiates another distribution."""
    pol = SyntheticPolicy.random(vocab_size=6, seed=5, scale=1.5)
    trunc, temp = Truncation(top_k=3), 0.7
    exact = pol.sampling(temp, trunc)
    comps = pol.sample([[]], 4000, pol.horizon, seed=2, temperature=temp, **trunc.kwargs())[0]
    toks = [c.tokens for c in comps]
    path = list(Counter(tuple(t) for t in toks if len(t) >= 4).most_common(1)[0][0])
    # forced rollouts through a token outside the support at node 0 (a teacher's candidate)
    out = [k for k in range(6) if exact.next_token_logprobs([[]])[0, k] == -math.inf and k != 0]
    forced = [[out[0]] + c.tokens for c in exact.sample([[out[0]]], 200, pol.horizon, seed=9)[0]]
    rs = RolloutSet.from_lists(
        toks + forced, [pol.is_success(t) for t in toks + forced], [0] * len(toks) + [1] * len(forced)
    )
    st = path_stats(path, rs, count_forced_at_ancestors=False)
    lpt = pol.tilted(3.0, seed=1).continuation_logprobs([], path)
    cfg = SignalConfig(min_visits=20, restriction="literal", alignment_estimator="plugin")
    lps_sampling = support_log_probs(pol.continuation_logprobs([], path), temp, trunc)
    sig = path_signals(st, lps_sampling, lpt, cfg)
    for u in range(3):
        value = exact.success_prob(path[:u])
        n = int(st.sampled[st.ptr[u] : st.ptr[u + 1]].sum())
        assert abs(sig["pbar"][u] - value) < 4 * math.sqrt(value * (1 - value) / n) + 1e-9
    assert all(np.isfinite(sig[k][0]) for k in ("norm_ideal", "norm_gkd", "kl"))
    # the ideal gradient's norm at node 0 from exact P_succ: P̃(k)(Q̃(k) - V) over S_u
    children, visits, _ = st.children(0)
    s_u = visits >= 20
    p_t = exact.next_token_logprobs([[]])[0].double().exp().numpy()[children[s_u]]
    q = exact.child_success_probs([])[children[s_u]]
    approx = np.linalg.norm(p_t * (q - exact.success_prob([])))
    assert sig["norm_ideal"][0] == pytest.approx(approx, rel=0.35, abs=0.01)
    sig_model = path_signals(st, pol.continuation_logprobs([], path), lpt, cfg)
    assert not np.allclose(sig_model["norm_ideal"][:3], sig["norm_ideal"][:3])


def test_diagnosis_samples_and_scores_with_the_runs_truncation(tmp_path: Any) -> None:
    """A synthetic run with ``top_k`` and a temperature: every sampled token is in the truncated
    support, and the node tables' ``p_student`` is the sampling distribution's."""
    opts = DiagnoseConfig(
        rollouts_per_question=150,
        max_new_tokens=10,
        chunk_rollouts=150,
        temperature=0.8,
        top_k=3,
        targeting=TargetingConfig(first_window=2, per_window_gkd=1, per_window_gap=1, visit_target=30),
        signals=SignalConfig(min_visits=10),
    )
    factory = SyntheticFactory(n_questions=1, options=opts)
    diag, envs = factory(str(tmp_path / "run"))
    diag.run(envs)
    exact = diag.student.sampling(0.8, Truncation(top_k=3))
    nodes, _, _ = load_results(diag.store)
    paths = diag.store.read_table(diag.store.paths_file(envs[0].id))
    for row in paths.itertuples():
        lp = exact.continuation_logprobs([], [int(t) for t in row.tokens])
        assert torch.isfinite(lp[range(len(row.tokens)), list(row.tokens)]).all()
        mine = nodes[(nodes.question_id == envs[0].id) & (nodes.path_id == row.path_id)].sort_values(
            ["teacher", "node"]
        )
        want = lp[range(len(row.tokens)), list(row.tokens)].exp().numpy()
        for _, grp in mine.groupby("teacher"):
            np.testing.assert_allclose(grp["p_student"].to_numpy(), want, atol=1e-6)
