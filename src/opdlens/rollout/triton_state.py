"""The Triton decode state of :class:`opdlens.rollout.TorchEngine`: the fused block forward with
Triton kernels, whose static buffers and CUDA graph (a :class:`Slot` per decode shape) are kept
across batches and ``sample`` calls (:class:`SlotCache`). The states' shared protocol and helpers
are in :mod:`opdlens.rollout.decode`."""

from __future__ import annotations

import torch

from opdlens.rollout.decode import (
    EngineView,
    Job,
    Prefill,
    StepGraphs,
    is_range,
    live_rows,
    pow2,
    round_up,
    run_on_side_stream,
)
from opdlens.rollout.model import KVSlot


class Slot:
    """Static buffers of one decode shape ``(P, R, T, S)`` and its CUDA graph, reused across
    batches and ``sample`` calls (prefix KV ``[L, P, Hkv, T, D]``, suffix KV ``[L, B, Hkv, S, D]``)."""

    def __init__(self, eng: EngineView, P: int, R: int, T: int, S: int) -> None:
        m = eng.bound
        dev, dt = eng.device, m.dtype
        L, Hkv, D = m.n_layers, m.n_kv, m.head_dim
        B = P * R
        self.P, self.R, self.T, self.S = P, R, T, S
        self.pre_k = torch.zeros(L, P, Hkv, T, D, dtype=dt, device=dev)
        self.pre_v = torch.zeros_like(self.pre_k)
        self.plen = torch.ones(P, dtype=torch.int32, device=dev)
        self.row_plen = torch.zeros(B, dtype=torch.long, device=dev)
        self.suf_k = torch.zeros(L, B, Hkv, S, D, dtype=dt, device=dev)
        self.suf_v = torch.zeros_like(self.suf_k)
        self.tok_in = torch.zeros(B, dtype=torch.long, device=dev)
        self.t_idx = torch.zeros(1, dtype=torch.long, device=dev)
        # one attention kernel per layer when each prefix has few rows and is short
        self.mode = 1 if (R <= 2 and T <= 1024) else 2
        from opdlens.rollout.triton_decode import prefix_chunk

        n_sm = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
        G = m.n_heads // Hkv
        self.chunk = prefix_chunk(P, Hkv, R * G, T, min(eng.config.prefix_chunk, 512), n_sm)
        self.graphs = StepGraphs(eng.stats)
        self.warm = False
        self.nbytes = eng.kv_bytes_per_token * P * (T + R * S)


class SlotCache:
    """The Triton state's slots by shape ``(P, R, T, S)``: at most ``size`` of them and, with the
    one being made, at most ``max_bytes`` of KV buffers; least recently used dropped first."""

    def __init__(self, size: int, max_bytes: int) -> None:
        self.size, self.max_bytes = size, max_bytes
        self.slots: dict[tuple[int, ...], Slot] = {}

    def get(self, eng: EngineView, P: int, R: int, T: int, S: int) -> Slot:
        key = (P, R, T, S)
        slot = self.slots.pop(key, None)
        if slot is None:
            need = eng.kv_bytes_per_token * P * (T + R * S)
            while self.slots and (
                len(self.slots) >= self.size or need + sum(s.nbytes for s in self.slots.values()) > self.max_bytes
            ):
                self.slots.pop(next(iter(self.slots)))
            slot = Slot(eng, P, R, T, S)
        self.slots[key] = slot
        return slot


class TritonState:
    """A ``[P, R]`` grid decoded by the block forward with the Triton kernels (see
    :mod:`opdlens.rollout.triton_decode`): one CUDA graph per slot shape, kept across calls."""

    @staticmethod
    def grid(batch: list[Job]) -> tuple[list[Job], int]:
        """The grid's jobs and rows per prefix, rounded up so that decode shapes recur across
        calls and their slots and CUDA graphs are reused: rows and prefixes to a multiple of an
        eighth of their power of two (< 25% padding; padding groups repeat the first prefix,
        with no live rows)."""
        R = max(j.rows for j in batch)
        R = round_up(R, max(1, pow2(R) // 8))
        P = round_up(len(batch), max(1, pow2(len(batch)) // 8))
        return batch + [Job(batch[0].prefix, 0, 0)] * (P - len(batch)), R

    def __init__(self, eng: EngineView, batch: list[Job], R: int, prefills: dict[int, Prefill], max_new: int) -> None:
        self.eng, self.m = eng, eng.bound
        P = len(batch)
        lens = [prefills[j.prefix].length for j in batch]
        T = round_up(max(lens), max(64, pow2(max(lens)) // 8))
        S = round_up(max(1, max_new - 1), 64)
        slot = eng.slots.get(eng, P, R, T, S)
        by_group: dict[int, tuple[torch.Tensor, torch.Tensor, list[int], list[int]]] = {}
        for p, j in enumerate(batch):  # one copy per prefill group, not one per prefix
            group = prefills[j.prefix].group
            assert group is not None
            gk, gv, r = group
            _, _, ps, rs = by_group.setdefault(id(gk), (gk, gv, [], []))
            ps.append(p)
            rs.append(r)
        for gk, gv, ps, rs in by_group.values():
            n = min(gk.shape[3], T)
            for dst, src in ((slot.pre_k, gk), (slot.pre_v, gv)):
                if is_range(ps) and is_range(rs):  # the usual case: a strided copy, not an index kernel
                    dst[:, ps[0] : ps[-1] + 1, :, :n].copy_(src[:, rs[0] : rs[-1] + 1, :, :n])
                else:
                    pi, ri = torch.tensor(ps, device=eng.device), torch.tensor(rs, device=eng.device)
                    dst[:, pi, :, :n] = src[:, ri, :, :n]
        lens_t = torch.tensor(lens, dtype=torch.int32)
        slot.plen.copy_(lens_t)
        slot.row_plen.copy_(lens_t.repeat_interleave(R))
        self.slot = slot
        self.signature = self.m.signature()  # captured graphs read these weight addresses
        self._warm()

    @property
    def P(self) -> int:
        return self.slot.P

    @property
    def R(self) -> int:
        return self.slot.R

    def _warm(self) -> None:
        """Build the kernels of a new slot (one eager step, also the warm-up before a capture)."""
        if not self.slot.warm:
            run_on_side_stream(self.eng.device, self._forward)
            self.slot.warm = True

    def step(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        s = self.slot
        s.tok_in.copy_(tok)
        s.t_idx.fill_(t)
        if not self.eng.cuda_graphs:
            return self._forward()
        return s.graphs(None, self._forward, self.signature)

    def _forward(self) -> torch.Tensor:
        m, s, tk = self.m, self.slot, self.m.ops.tk  # type: ignore[attr-defined]
        B, H, D = s.tok_in.numel(), m.n_heads, m.head_dim
        x = m.embed(s.tok_in)  # [B, hidden]
        cos, sin = m.rope(s.row_plen + s.t_idx, x.dtype)  # [B, D]

        def kv(li: int) -> KVSlot:
            return s.suf_k[li], s.suf_v[li], s.t_idx

        def attend(li: int, q: torch.Tensor) -> torch.Tensor:
            return tk.decode_attention(
                q, s.suf_k[li], s.suf_v[li], s.t_idx, s.pre_k[li], s.pre_v[li], s.plen, s.R, m.scaling, s.mode, s.chunk
            ).view(B, H * D)

        return m.lm_head(m.forward(x, cos, sin, kv, attend))

    def compact(self, alive: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Move the live rows to a smaller grid ``[P', R']`` (R' a power of two where that is
        smaller, P' rounded up to 1/8 of its power of two, so that grids recur and their graphs
        are reused). None if nothing shrinks."""
        P, R = self.P, self.R
        grid = alive.view(P, R)
        per = grid.sum(1)
        groups = per.nonzero()[:, 0]
        most = int(per.max())
        R2 = pow2(most) if pow2(most) < R else most
        # groups padded to a recurring count (<= 1/8 more), so the next call's compaction finds
        # its graph; padding groups repeat a live group's prefix and hold only dead rows
        P2 = min(P, round_up(len(groups), max(1, pow2(len(groups)) // 8)))
        if P2 == P and R2 == R:
            return None
        n_live = per[groups]
        self.eng.stats["padded_groups"] = self.eng.stats.get("padded_groups", 0) + P2 - len(groups)
        groups = torch.cat([groups, groups[:1].repeat(P2 - len(groups))])
        n_live = torch.cat([n_live, torch.zeros(P2 - len(n_live), dtype=n_live.dtype)])
        idx, pad = live_rows(grid, groups, n_live, R2)
        old = self.slot
        keep = idx.flatten().to(self.eng.device)
        g = groups.to(self.eng.device)
        new = self.eng.slots.get(self.eng, P2, R2, old.T, old.S)
        assert new is not old
        new.pre_k.copy_(old.pre_k[:, g])
        new.pre_v.copy_(old.pre_v[:, g])
        new.plen.copy_(old.plen[g])
        new.row_plen.copy_(old.row_plen[keep])
        used = t + 1  # slots 0..t are written
        new.suf_k[:, :, :, :used] = old.suf_k[:, keep, :, :used]
        new.suf_v[:, :, :, :used] = old.suf_v[:, keep, :, :used]
        self.slot = new
        self.eng.stats["compactions"] = self.eng.stats.get("compactions", 0) + 1
        return keep, pad.flatten().to(keep.device)
