"""Per-backend decode states of :class:`opdlens.rollout.TorchEngine`: each owns a batch's
buffers and offers the two calls the engine's one decode loop makes.

* ``step(tok [B], t) -> logits [B, V]``: feed one token per row at generated position ``t``;
* ``compact(alive [B] bool, t) -> (keep, pad) | None``: drop finished rows; ``keep`` are the
  old row indices of the new rows, ``pad`` marks padding rows of the new grid (dead).

States: :class:`HFState` (Hugging Face forward and cache), :class:`TorchState` (the fused block
forward with PyTorch ops, prefix keys in chunks merged by log-sum-exp), :class:`TritonState`
(the fused block forward with Triton kernels, buffers of a :class:`Slot` kept across calls;
in :mod:`opdlens.rollout.triton_state`).
CUDA graphs are captured and replayed in one place, :class:`StepGraphs`.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from opdlens.rollout.base import EngineConfig
from opdlens.rollout.model import BoundModel

if TYPE_CHECKING:
    from opdlens.rollout.triton_state import SlotCache

_NEG_INF = float("-inf")


class EngineView(Protocol):
    """What the decode states read from their :class:`opdlens.rollout.TorchEngine` (settings,
    the bound model, the slot cache and the stats they add to)."""

    config: EngineConfig
    model: Any
    device: torch.device
    cuda_graphs: bool
    fused_attention: bool
    cache_kw: str
    bound: BoundModel | None
    slots: SlotCache
    warm_shapes: set[tuple[int, ...]]
    stats: dict[str, float]

    @property
    def kv_bytes_per_token(self) -> int: ...


@dataclass
class Job:
    """Rows of one prefix decoded in a batch: samples ``first .. first + rows - 1`` of it."""

    prefix: int  # index into the request's prefixes
    first: int  # index of this job's first sample among the prefix's n
    rows: int


@dataclass
class Prefill:
    """A prefix's KV cache and last-position logits, computed once per prefix."""

    length: int
    logits: torch.Tensor  # [V]
    group: tuple[torch.Tensor, torch.Tensor, int] | None = None  # fused: (k, v) of its prefill group, its index
    cache: Any = None  # hf: the model's cache object

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused: this prefix's keys and values ``[L, Hkv, length, D]`` (views into its group's)."""
        assert self.group is not None
        k, v, r = self.group
        return k[:, r, :, : self.length], v[:, r, :, : self.length]


class DecodeState(Protocol):
    def step(self, tok: torch.Tensor, t: int) -> torch.Tensor: ...

    def compact(self, alive: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor] | None: ...


# ---------------------------------------------------------------------------- CUDA graphs
#: Held while a CUDA graph is captured. A capture fails when another thread makes a CUDA call
#: that is not allowed during one (a synchronisation, a new allocation), so other threads that
#: use the GPU while an engine may capture (the diagnose run's scoring of finished questions)
#: hold it around their GPU work.
CAPTURE_LOCK = threading.Lock()


def run_on_side_stream(device: torch.device, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` eagerly (on CUDA on a side stream, as a warm-up before a capture must be)."""
    if device.type != "cuda":
        return fn()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return out


class StepGraphs:
    """CUDA graphs of a decode step, one per key, captured on first use and replayed after;
    recaptured when the ``signature`` (e.g. weight addresses) changes. The step reads and writes
    only static buffers, so a replay is the step."""

    def __init__(self, stats: dict[str, float], pool: Any = None) -> None:
        self.stats = stats
        self.pool = pool
        self.entries: dict[Hashable, tuple[Any, torch.Tensor, Any]] = {}

    def __call__(self, key: Hashable, forward: Callable[[], torch.Tensor], signature: Any = None) -> torch.Tensor:
        entry = self.entries.get(key)
        if entry is None or entry[2] != signature:
            self.entries.pop(key, None)
            graph = torch.cuda.CUDAGraph()
            with CAPTURE_LOCK, torch.cuda.graph(graph, pool=self.pool):
                out = forward()
            entry = self.entries[key] = (graph, out, signature)
            self.stats["graphs"] += 1
        entry[0].replay()
        return entry[1]


# ---------------------------------------------------------------------------- compaction helpers
def live_rows(
    grid: torch.Tensor, groups: torch.Tensor, n_live: torch.Tensor, R2: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Old row indices of a compacted ``[len(groups), R2]`` grid and its padding mask.

    ``grid [P, R]`` marks live rows; group ``i`` of the new grid takes old group ``groups[i]``'s
    live rows in order, its first ``n_live[i]`` slots are real and the rest (padding, marked
    True) repeat its first live row, so they read valid memory and are then ignored."""
    R = grid.shape[1]
    order = torch.argsort((~grid[groups]).to(torch.int8), dim=1, stable=True)[:, :R2]  # live rows first
    idx = order + groups[:, None] * R
    pad = torch.arange(R2)[None] >= n_live[:, None]
    return torch.where(pad, idx[:, :1], idx), pad


def pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def is_range(xs: list[int]) -> bool:
    """True if ``xs`` is ``[a, a + 1, ..., b]``."""
    return all(b == a + 1 for a, b in zip(xs, xs[1:]))


# ---------------------------------------------------------------------------- HF backend
class HFState:
    """One prefix's rows decoded by the Hugging Face forward with the model's cache object."""

    @staticmethod
    def grid(batch: list[Job]) -> tuple[list[Job], int]:
        (job,) = batch
        return batch, job.rows

    def __init__(self, eng: EngineView, pre: Prefill, rows: int) -> None:
        self.eng = eng
        self.cache = copy.deepcopy(pre.cache)  # the cache object is mutated below
        self.cache.batch_repeat_interleave(rows)
        self.plen = pre.length

    def step(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        pos = torch.full((tok.numel(), 1), self.plen + t, dtype=torch.long, device=tok.device)
        out = self.eng.model(
            input_ids=tok[:, None], position_ids=pos, use_cache=True, **{self.eng.cache_kw: self.cache}
        )
        self.cache = getattr(out, "cache", None) or out.past_key_values
        return out.logits[:, -1]

    def compact(self, alive: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = alive.nonzero()[:, 0].to(self.eng.device)
        self.cache.batch_select_indices(keep)
        self.eng.stats["compactions"] = self.eng.stats.get("compactions", 0) + 1
        return keep, torch.zeros(keep.numel(), dtype=torch.bool, device=keep.device)


# ---------------------------------------------------------------------------- fused, PyTorch ops
class TorchState:
    """A ``[P, R]`` grid of rows (``R`` rows of each of ``P`` prefixes) decoded by the block
    forward with PyTorch ops. Prefix keys ``[L, P, C, Hkv, Lc, D]`` are split in ``C`` chunks of
    ``Lc`` keys attended in parallel and merged by log-sum-exp; each row's own keys go to a suffix
    cache ``[L, B, Hkv, S, D]``. On CUDA a step is captured per suffix-length bucket."""

    @staticmethod
    def grid(batch: list[Job]) -> tuple[list[Job], int]:
        """The grid's jobs and rows per prefix: exactly the batch."""
        return batch, max(j.rows for j in batch)

    def __init__(self, eng: EngineView, batch: list[Job], R: int, prefills: dict[int, Prefill], max_new: int) -> None:
        m = eng.bound
        dev, L, Hkv, D, dt = eng.device, m.n_layers, m.n_kv, m.head_dim, m.dtype
        self.eng, self.m = eng, m
        P = len(batch)
        lens = [prefills[j.prefix].length for j in batch]
        align = 16 if eng.fused_attention else 1
        Lc = -(-max(lens) // align) * align
        if Lc > eng.config.prefix_chunk:
            Lc = -(-eng.config.prefix_chunk // align) * align
        C = -(-max(lens) // Lc)
        self.pre_k = torch.zeros(L, P, C, Hkv, Lc, D, dtype=dt, device=dev)
        self.pre_v = torch.zeros_like(self.pre_k)
        for p, j in enumerate(batch):
            pf = prefills[j.prefix]
            for src, dst in zip(pf.kv(), (self.pre_k, self.pre_v)):
                padded = F.pad(src, (0, 0, 0, C * Lc - pf.length))  # [L, Hkv, C*Lc, D]
                dst[:, p] = padded.view(L, Hkv, C, Lc, D).transpose(1, 2)
        lens_t = torch.tensor(lens, device=dev)
        self.pre_bias: torch.Tensor | None = None
        if min(lens) != C * Lc:
            pos = torch.arange(C * Lc, device=dev).view(1, C, 1, 1, Lc)
            self.pre_bias = torch.zeros(P, C, Hkv, 1, Lc, dtype=dt, device=dev)
            self.pre_bias.masked_fill_(pos >= lens_t.view(P, 1, 1, 1, 1), _NEG_INF)
        self.P, self.R = P, R
        s_cap = max(1, max_new - 1)
        if dev.type == "cuda":
            s_cap = -(-s_cap // 16) * 16  # aligned key length for the fused attention kernel
        self.suf_k = torch.zeros(L, P * R, Hkv, s_cap, D, dtype=dt, device=dev)
        self.suf_v = torch.zeros_like(self.suf_k)
        self.row_plen = lens_t.repeat_interleave(R)
        self.tok_in = torch.zeros(P * R, dtype=torch.long, device=dev)
        self.t_idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.graphs = StepGraphs(eng.stats, torch.cuda.graph_pool_handle() if eng.cuda_graphs else None)

    def step(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        self.tok_in.copy_(tok)
        self.t_idx.fill_(t)
        eng = self.eng
        if eng.device.type == "cuda":
            sb = min(self.suf_k.shape[3], round_up(t + 1, eng.config.suffix_bucket))
        else:
            sb = t + 1
        if not eng.cuda_graphs:
            return self._forward(sb)
        shape = (self.tok_in.numel(), sb, self.pre_k.shape[2], self.pre_k.shape[4])
        if shape not in eng.warm_shapes and sb not in self.graphs.entries:  # warm-up once per shape (lazy library init)
            run_on_side_stream(eng.device, lambda: self._forward(sb))  # writes the slot the replay will write
            eng.warm_shapes.add(shape)
        return self.graphs(sb, lambda: self._forward(sb))

    def _forward(self, sb: int) -> torch.Tensor:
        m = self.m
        x = m.embed(self.tok_in)  # [B, hidden]
        cos, sin = m.rope(self.row_plen + self.t_idx, x.dtype)
        suf_bias = torch.zeros(sb, dtype=torch.float32, device=x.device)
        suf_bias.masked_fill_(torch.arange(sb, device=x.device) > self.t_idx, _NEG_INF)
        B, H, Hkv, D = self.tok_in.numel(), m.n_heads, m.n_kv, m.head_dim

        def attend(li: int, q: torch.Tensor) -> torch.Tensor:
            return self._attention(q.reshape(B, Hkv, H // Hkv, D), li, sb, suf_bias).reshape(B, H * D)

        h = m.forward(x, cos, sin, lambda li: (self.suf_k[li], self.suf_v[li], self.t_idx), attend)
        return m.lm_head(h)

    def _attention(self, q: torch.Tensor, li: int, sb: int, suf_bias: torch.Tensor) -> torch.Tensor:
        """Attention of ``q [B, Hkv, G, D]`` over shared prefix + own suffix; returns ``[B, Hkv, G, D]``."""
        P, R = self.P, self.R
        B, Hkv, G, D = q.shape
        # prefix part: queries of a prefix's R rows x G heads share one K/V per kv-head
        C, Lc = self.pre_k.shape[2], self.pre_k.shape[4]
        qp = q.view(P, R, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(P, 1, Hkv, R * G, D)
        if C > 1:
            qp = qp.expand(P, C, Hkv, R * G, D)
        qp = qp.reshape(P, C * Hkv, R * G, D)
        kp = self.pre_k[li].view(P, C * Hkv, Lc, D)
        vp = self.pre_v[li].view(P, C * Hkv, Lc, D)
        bias = None if self.pre_bias is None else self.pre_bias.view(P, C * Hkv, 1, Lc)
        # the fused kernel is used where it was validated on GPU: unchunked, or chunked without padding
        out_p, lse_p = self._attend(qp, kp, vp, bias, fused=C == 1 or bias is None)
        if C > 1:  # merge the key chunks (flash-decoding)
            lse_c = lse_p.view(P, C, Hkv, R * G)
            lse_p = torch.logsumexp(lse_c, dim=1)
            wgt = torch.exp(lse_c - lse_p[:, None]).nan_to_num_(0.0)
            out_p = torch.einsum("pchm,pchmd->phmd", wgt, out_p.view(P, C, Hkv, R * G, D).float().nan_to_num_(0.0))
            out_p = out_p.to(q.dtype)
        out_p = out_p.reshape(P, Hkv, R, G, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, G, D)
        lse_p = lse_p.reshape(P, Hkv, R, G).permute(0, 2, 1, 3).reshape(B, Hkv, G)
        # suffix part: each row's own generated tokens
        ks = self.suf_k[li][:, :, :sb]
        vs = self.suf_v[li][:, :, :sb]
        out_s, lse_s = self._attend(q, ks, vs, suf_bias.view(1, 1, 1, sb), fused=False)
        # merge by log-sum-exp weights: out = out_s + sigmoid(lse_p - lse_s) * (out_p - out_s)
        wp = torch.sigmoid(lse_p - lse_s)[..., None]
        if q.dtype == torch.float32:
            return torch.lerp(out_s, out_p, wp)
        return torch.lerp(out_s.float(), out_p.float(), wp).to(q.dtype)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, fused: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-causal attention with its log-sum-exp: ``q [N, H, M, D]``, ``k, v [N, H, T, D]``."""
        if self.eng.fused_attention and fused:
            b = None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], bias.shape[-1])
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, b, True, 0.0, False, scale=self.m.scaling
            )[:2]
            return out, lse[..., : q.shape[2]]
        s = torch.matmul(q, k.transpose(-1, -2)).float() * self.m.scaling
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v)
        return out, lse

    def compact(self, alive: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop finished rows (and prefixes with none left) into an exact-size ``[P', R']`` grid."""
        P, R = self.P, self.R
        grid = alive.view(P, R)
        per = grid.sum(1)
        groups = per.nonzero()[:, 0]
        R2 = int(per.max())
        idx, pad = live_rows(grid, groups, per[groups], R2)
        keep = idx.flatten().to(self.eng.device)
        self.P, self.R = len(groups), R2
        used = t + 1  # slots 0..t are written
        new_k = torch.zeros(
            (self.suf_k.shape[0], keep.numel(), *self.suf_k.shape[2:]), dtype=self.suf_k.dtype, device=keep.device
        )
        new_v = torch.zeros_like(new_k)
        new_k[:, :, :, :used] = self.suf_k[:, keep, :, :used]
        new_v[:, :, :, :used] = self.suf_v[:, keep, :, :used]
        self.suf_k, self.suf_v = new_k, new_v
        if len(groups) < P:
            g = groups.to(keep.device)
            self.pre_k, self.pre_v = self.pre_k[:, g], self.pre_v[:, g]
            if self.pre_bias is not None:
                self.pre_bias = self.pre_bias[g]
        self.row_plen = self.row_plen[keep]
        self.tok_in = torch.zeros(keep.numel(), dtype=torch.long, device=keep.device)
        self.graphs = StepGraphs(self.eng.stats, torch.cuda.graph_pool_handle() if self.eng.cuda_graphs else None)
        self.eng.stats["compactions"] = self.eng.stats.get("compactions", 0) + 1
        return keep, pad.flatten().to(keep.device)
