"""A synthetic policy whose success probabilities are exact: the oracle of the test-suite.

The policy is a Markov model over a small vocabulary ``0..V-1`` (token 0 is EOS). Its state
after ``t`` generated tokens is ``(t, last token, sum of tokens mod M)`` and its next-token
logits are a table indexed by that state. A generation *succeeds* when it emits EOS while the
running sum is ``≡ target (mod M)``; reaching the horizon ``L`` without EOS fails.

Because the state is finite, ``P(success | prefix, next token k)`` is computed exactly by
backward dynamic programming, which is what the estimators (P_succ, ideal gradient,
alignment) must converge to. A teacher is built by tilting the student's logits towards
(or away from) success, plus noise, so its alignment with the ideal gradient is controlled.

Prompt tokens (the first ``prompt_len`` tokens of any prefix) are ignored by the model, so the
same prefixes can carry a task prompt through the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from opdlens.errors import OpdlensError
from opdlens.policy import Completion, TokenSeq, sample_counts
from opdlens.sampling import NO_TRUNCATION, Truncation, sampling_log_probs

EOS = 0


class SyntheticPolicy:
    """Markov policy with exact success probabilities (see module docstring)."""

    def __init__(
        self,
        logits: np.ndarray,
        modulus: int,
        target: int = 0,
        prompt_len: int = 0,
    ) -> None:
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 4:
            raise OpdlensError("logits table must have shape [L, V+1, M, V]")
        horizon, n_last, m, vocab = logits.shape
        if n_last != vocab + 1 or m != modulus:
            raise OpdlensError(f"logits table shape {logits.shape} inconsistent with V={vocab}, M={modulus}")
        self.logits = logits
        self.horizon = horizon
        self.modulus = modulus
        self.target = target % modulus
        self.prompt_len = prompt_len
        self._vocab = vocab
        self._logp = logits - _logsumexp(logits, axis=-1)
        self._value = self._dp()

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(
        cls,
        vocab_size: int = 5,
        horizon: int = 8,
        modulus: int = 3,
        *,
        seed: int = 0,
        scale: float = 1.0,
        eos_bias: float = -0.5,
        prompt_len: int = 0,
    ) -> SyntheticPolicy:
        rng = np.random.default_rng(seed)
        logits = rng.normal(0.0, scale, size=(horizon, vocab_size + 1, modulus, vocab_size))
        logits[..., EOS] += eos_bias
        logits[0, :, :, EOS] = -30.0  # no empty generations
        return cls(logits, modulus, target=0, prompt_len=prompt_len)

    def tilted(self, beta: float, noise: float = 0.0, *, seed: int = 0) -> SyntheticPolicy:
        """A teacher: logits + beta * (exact child success prob - 1/2) + Gaussian noise.

        ``beta > 0`` favours success-leading tokens (a helpful teacher), ``beta < 0`` a
        harmful one; ``noise`` adds directions unrelated to success (style).
        """
        rng = np.random.default_rng(seed)
        q = self._child_values()  # [L, V+1, M, V]
        logits = self.logits + beta * (q - 0.5) + noise * rng.normal(size=self.logits.shape)
        return SyntheticPolicy(logits, self.modulus, self.target, self.prompt_len)

    def sampling(self, temperature: float = 1.0, trunc: Truncation = NO_TRUNCATION) -> SyntheticPolicy:
        """The policy that :meth:`sample` at ``temperature`` with ``trunc`` draws from: its table
        is :func:`opdlens.sampling.sampling_log_probs` of this one's (dropped tokens ``-inf``), so
        its DP gives the exact success probabilities of a tree sampled with those settings."""
        table = sampling_log_probs(torch.from_numpy(self._logp), temperature, trunc).numpy()
        return SyntheticPolicy(table, self.modulus, self.target, self.prompt_len)

    # ------------------------------------------------------------------ exact oracle
    def _child_values(self) -> np.ndarray:
        """Q[t, a, s, k] = P(success | state (t, a, s), next token k)."""
        horizon, vocab, m = self.horizon, self._vocab, self.modulus
        q = np.zeros((horizon, vocab + 1, m, vocab))
        for t in range(horizon):
            for s in range(m):
                q[t, :, s, EOS] = float(s == self.target)
                for k in range(1, vocab):
                    q[t, :, s, k] = self._value[t + 1, k, (s + k) % m]
        return q

    def _dp(self) -> np.ndarray:
        """value[t, a, s] = P(success | state before the t-th generated token)."""
        horizon, vocab, m = self.horizon, self._vocab, self.modulus
        value = np.zeros((horizon + 1, vocab + 1, m))  # value at t = horizon is 0 (cap = failure)
        probs = np.exp(self._logp)
        for t in range(horizon - 1, -1, -1):
            child = np.zeros((m, vocab))
            for s in range(m):
                child[s, EOS] = float(s == self.target)
                for k in range(1, vocab):
                    child[s, k] = value[t + 1, k, (s + k) % m]
            value[t] = np.einsum("asv,sv->as", probs[t], child)
        return value

    def _state(self, prefix: TokenSeq) -> tuple[int, int, int]:
        gen = list(prefix[self.prompt_len :])
        if any(tok == EOS for tok in gen):
            raise OpdlensError("prefix already contains EOS: it has no next token")
        t = len(gen)
        if t >= self.horizon:
            raise OpdlensError(f"prefix of {t} generated tokens is at or past the horizon {self.horizon}")
        last = gen[-1] if gen else self._vocab  # V = start state
        return t, last, sum(gen) % self.modulus

    def child_success_probs(self, prefix: TokenSeq) -> np.ndarray:
        """Exact P(success | prefix + k) for every token k: ``[V]``."""
        t, a, s = self._state(prefix)
        out = np.empty(self._vocab)
        out[EOS] = float(s == self.target)
        for k in range(1, self._vocab):
            out[k] = self._value[t + 1, k, (s + k) % self.modulus]
        return out

    def success_prob(self, prefix: TokenSeq) -> float:
        """Exact P(success | prefix)."""
        t, a, s = self._state(prefix)
        return float(self._value[t, a, s])

    def is_success(self, generated: TokenSeq) -> bool:
        """Outcome of a finished generation (generated tokens only)."""
        gen = list(generated)
        if not gen or gen[-1] != EOS:
            return False
        return sum(gen) % self.modulus == self.target

    # ------------------------------------------------------------------ Policy protocol
    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({EOS})

    def next_token_logprobs(self, prefixes: Sequence[TokenSeq]) -> torch.Tensor:
        rows = [self._logp[self._state(p)] for p in prefixes]
        return torch.tensor(np.stack(rows), dtype=torch.float32)

    def continuation_logprobs(self, context: TokenSeq, continuation: TokenSeq) -> torch.Tensor:
        ctx = list(context)
        cont = list(continuation)
        prefixes = [ctx + cont[:t] for t in range(len(cont))]
        if not prefixes:
            return torch.empty(0, self._vocab)
        return self.next_token_logprobs(prefixes)

    def sample(
        self,
        prefixes: Sequence[TokenSeq],
        n: int | Sequence[int],
        max_new_tokens: int,
        *,
        seed: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
    ) -> list[list[Completion]]:
        trunc = Truncation(top_p, top_k, min_p)
        rng = np.random.default_rng(seed)
        out: list[list[Completion]] = []
        for prefix, rows in zip(prefixes, sample_counts(n, len(prefixes))):
            t0, a0, s0 = self._state(prefix)
            t = np.full(rows, t0)
            a = np.full(rows, a0)
            s = np.full(rows, s0)
            alive = np.ones(rows, dtype=bool)
            toks: list[list[int]] = [[] for _ in range(rows)]
            lps: list[list[float]] = [[] for _ in range(rows)]
            for _ in range(max_new_tokens):
                idx = np.flatnonzero(alive & (t < self.horizon))
                if idx.size == 0:
                    break
                logp = self._logp[t[idx], a[idx], s[idx]]
                if trunc.active:
                    logp = sampling_log_probs(torch.from_numpy(logp), temperature, trunc).numpy()
                else:
                    logp = logp / temperature
                    logp = logp - _logsumexp(logp, axis=-1)
                u = rng.random(idx.size)
                # inverse CDF; a u above the rounded total takes the last token of positive probability
                last = self._vocab - 1 - np.argmax(np.isfinite(logp[:, ::-1]), axis=-1)
                k = np.minimum((np.cumsum(np.exp(logp), axis=-1) < u[:, None]).sum(-1), last)
                for j, i in enumerate(idx):
                    toks[i].append(int(k[j]))
                    lps[i].append(float(logp[j, k[j]]))
                alive[idx] = k != EOS
                t[idx] += 1
                a[idx] = k
                s[idx] = (s[idx] + k) % self.modulus
            out.append(
                [Completion(toks[i], lps[i], finished=bool(toks[i]) and toks[i][-1] == EOS) for i in range(rows)]
            )
        return out


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    mx = x.max(axis=axis, keepdims=True)
    return mx + np.log(np.exp(x - mx).sum(axis=axis, keepdims=True))
