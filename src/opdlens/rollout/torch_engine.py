"""Shared-prefix batched sampling with PyTorch, on CPU and CUDA.

Two backends behind :class:`TorchEngine`:

``"fused"`` (Llama-family models: ``llama``, ``qwen2``, ``qwen3``)
    Each prefix is prefilled once (the engine's own forward over right-padded prompts, same math
    as the decode step, K/V written straight into one buffer); its KV cache is stored **once** and
    shared by all its rows: a decode step attends to the shared prefix cache (one batched
    attention per prefix, memory-efficient kernel with log-sum-exp on CUDA) and to a per-row
    suffix cache (pre-allocated, written in place), and merges the two by their log-sum-exps.
    No n-fold copy of the prefix exists, so an 8K-token prefix with 100 rows costs one 8K cache.
    Several prefixes are decoded together as a ``[P, R]`` grid of rows (``max_batch_rows``).
    Finished rows are dropped from the grid (compaction) once the live fraction falls under
    ``compact_below``. On CUDA each decode step (all layers, static shapes, suffix length in
    buckets) is captured once in a CUDA graph and replayed.

``"hf"`` (any causal LM)
    One prefix at a time: Hugging Face prefill, KV cache repeated to the prefix's rows, then
    decode with ``past_key_values``; finished rows are dropped from the cache.

Both sample from a ``torch.Generator`` seeded by ``seed`` (Gumbel-max in PyTorch on CPU, an
inverse-CDF Triton sampler on CUDA): same seed and same engine settings give the same
completions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import inspect

import torch
import torch.nn.functional as F

from opdlens.policy import Completion, OpdlensError, TokenSeq
from opdlens.rollout.base import completions_from_buffers, make_generator, sample_tokens, validate_request

FUSED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_NEG_INF = float("-inf")


def fused_supported(model: torch.nn.Module) -> str | None:
    """None if the fused backend can run ``model``; otherwise the reason why not."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in FUSED_MODEL_TYPES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} not in {FUSED_MODEL_TYPES}"
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return "unexpected module layout"
    rope = getattr(base.rotary_emb, "rope_type", "default")
    if rope not in ("default", "linear", "llama3", "yarn"):
        return f"rope type {rope!r} (position-dependent frequencies) is not supported"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention is not supported"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "non-full attention layers are not supported"
    return None


@dataclass
class _Job:
    prefix: int  # index into the request's prefixes
    first: int  # index of this job's first sample among the prefix's n
    rows: int


@dataclass
class _Prefill:
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


class TorchEngine:
    """Sampling engine over a Hugging Face causal LM (see module docstring).

    Parameters: ``max_batch_rows`` rows decoded together; ``max_kv_bytes`` bound on the suffix
    KV cache of one batch (default: 40% of free GPU memory, 2 GiB on CPU); ``backend`` one of
    ``"auto"``, ``"fused"``, ``"hf"``; ``cuda_graphs`` (default: on for CUDA); ``sync_every``
    steps between host checks of finished rows (default 1 on CPU, 16 on CUDA); ``compact_below``
    live fraction under which finished rows are dropped; ``suffix_bucket`` granularity of the
    suffix-length buckets of the CUDA graphs (torch kernels); ``kernels`` ``"triton"`` (default on
    CUDA: the fused Triton decode step of :mod:`opdlens.rollout.triton_decode`, one CUDA graph per
    decode shape, kept across ``sample`` calls in an LRU of ``graph_cache`` shapes) or ``"torch"``
    (the PyTorch-op step, the CPU default); ``prefix_chunk`` keys per chunk of the split-key prefix
    attention (the smallest: on CUDA chunks grow until the grid has at most 2 programs per SM).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        eos_token_ids: Iterable[int],
        pad_token_id: int,
        device: str | torch.device | None = None,
        *,
        max_batch_rows: int = 256,
        max_kv_bytes: int | None = None,
        backend: str = "auto",
        cuda_graphs: bool | None = None,
        sync_every: int | None = None,
        compact_below: float = 0.5,
        suffix_bucket: int = 64,
        fused_attention: bool = True,
        sampler: str = "auto",
        prefix_chunk: int = 512,
        kernels: str = "auto",
        graph_cache: int = 2,
    ) -> None:
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.eos_ids = frozenset(int(e) for e in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        if max_batch_rows < 1:
            raise OpdlensError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.max_batch_rows = max_batch_rows
        is_cuda = self.device.type == "cuda"
        if max_kv_bytes is None:
            max_kv_bytes = int(0.4 * torch.cuda.mem_get_info(self.device)[0]) if is_cuda else 2 << 30
        self.max_kv_bytes = max_kv_bytes
        reason = fused_supported(model)
        if backend == "auto":
            backend = "fused" if reason is None else "hf"
        if backend not in ("fused", "hf"):
            raise OpdlensError(f"backend must be 'auto', 'fused' or 'hf', got {backend!r}")
        if backend == "fused" and reason is not None:
            raise OpdlensError(f"the fused backend cannot run this model ({reason}); use backend='hf'")
        self.backend = backend
        self.cuda_graphs = is_cuda if cuda_graphs is None else (bool(cuda_graphs) and is_cuda)
        self.sync_every = sync_every or (16 if is_cuda else 1)
        self.compact_below = compact_below
        self.suffix_bucket = suffix_bucket
        self.fused_attention = fused_attention and is_cuda
        self.prefix_chunk = prefix_chunk
        self._weights: _FusedWeights | None = None
        vocab = model.get_output_embeddings().weight.shape[0]
        self._eos_lut = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        if self.eos_ids:
            self._eos_lut[torch.tensor(sorted(self.eos_ids), device=self.device)] = True
        cfg = model.config
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.dtype = next(model.parameters()).dtype
        self.stats: dict[str, float] = {}
        self._warm_shapes: set[tuple[int, int]] = set()
        self._sample = self._pick_sampler(sampler)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        if kernels not in ("auto", "torch", "triton"):
            raise OpdlensError(f"kernels must be 'auto', 'torch' or 'triton', got {kernels!r}")
        from opdlens.rollout import triton_decode

        if kernels == "triton" and not triton_decode.available():
            raise OpdlensError("kernels='triton' needs Triton")
        if kernels == "auto":
            kernels = "triton" if (is_cuda and self.backend == "fused" and triton_decode.available()) else "torch"
        self.kernels = kernels if self.backend == "fused" else "torch"
        self._kernels_forced = kernels == "triton"
        self.graph_cache = max(1, int(graph_cache))
        self.timing = False  # benchmarks: record stats["prefill_s"] (adds device syncs)
        self._slots: dict[tuple[int, ...], _Slot] = {}

    def _pick_sampler(self, sampler: str) -> Any:
        """``"torch"`` (Gumbel-max in PyTorch, the CPU default) or ``"triton"`` (inverse-CDF, CUDA only).

        ``"auto"`` takes Triton on CUDA when it imports and passes a self-check."""
        if sampler not in ("auto", "torch", "triton"):
            raise OpdlensError(f"sampler must be 'auto', 'torch' or 'triton', got {sampler!r}")
        if sampler == "torch" or self.device.type != "cuda":
            if sampler == "triton":
                raise OpdlensError("the triton sampler needs a CUDA device")
            self.sampler = "torch"
            return sample_tokens
        from opdlens.rollout import triton_sampler

        try:
            gen = make_generator(self.device, 0)
            x = torch.randn(3, 5000, device=self.device, generator=gen).to(self.dtype) * 3
            tok, lp = triton_sampler.sample_tokens_triton(x, 0.7, gen)
            ref = torch.log_softmax(x.float() / 0.7, -1).gather(1, tok[:, None])[:, 0]
            if not bool(((lp - ref).abs() < 1e-4).all()):
                raise RuntimeError(f"self-check failed: {lp.tolist()} vs {ref.tolist()}")
        except Exception as exc:  # triton missing or broken: fall back
            if sampler == "triton":
                raise OpdlensError(f"the triton sampler does not work here: {exc}") from exc
            self.sampler = "torch"
            return sample_tokens
        self.sampler = "triton"
        return triton_sampler.sample_tokens_triton

    # ------------------------------------------------------------------ public API
    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv * self.head_dim * torch.finfo(self.dtype).bits // 8

    @torch.inference_mode()
    def sample(
        self,
        prefixes: Sequence[TokenSeq],
        n: int,
        max_new_tokens: int,
        *,
        seed: int,
        temperature: float = 1.0,
    ) -> list[list[Completion]]:
        seqs = validate_request(prefixes, n, max_new_tokens, temperature)
        result: list[list[Completion]] = [[Completion([], [], False) for _ in range(n)] for _ in seqs]
        if max_new_tokens == 0 or not seqs:
            return result
        gen = make_generator(self.device, seed)
        self.stats = {"decode_steps": 0, "row_steps": 0, "prefills": 0, "graphs": 0, "batches": 0}
        row_cap = max(1, min(self.max_batch_rows, self.max_kv_bytes // max(1, max_new_tokens * self.kv_bytes_per_token)))
        # jobs: (prefix, rows) chunks of at most row_cap rows; prefixes sorted by length
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        jobs = [_Job(i, s, min(row_cap, n - s)) for i in order for s in range(0, n, row_cap)]
        remaining = {i: -(-n // row_cap) for i in order}  # jobs left per prefix (to drop its prefill)
        prefills: dict[int, _Prefill] = {}
        for batch in self._plan(jobs, row_cap, seqs):
            self.stats["batches"] += 1
            todo = list(dict.fromkeys(j.prefix for j in batch if j.prefix not in prefills))
            t0 = self._clock()
            if self.backend == "fused":
                prefills.update(self._prefill_many([seqs[i] for i in todo], todo))
            else:
                for i in todo:
                    prefills[i] = self._prefill(seqs[i])
            if t0 is not None:
                self.stats["prefill_s"] = self.stats.get("prefill_s", 0.0) + self._clock() - t0
            if self.backend == "fused":
                comps = self._decode_fused(batch, prefills, max_new_tokens, temperature, gen)
            else:
                comps = self._decode_hf(batch, seqs, prefills, max_new_tokens, temperature, gen)
            for job, cs in zip(batch, comps):
                result[job.prefix][job.first:job.first + job.rows] = cs
                remaining[job.prefix] -= 1
                if remaining[job.prefix] == 0:
                    del prefills[job.prefix]
        return result

    def _clock(self) -> float | None:
        """Host time after a device sync, only when ``self.timing`` is set (benchmarks)."""
        if not self.timing:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        import time

        return time.perf_counter()

    def _plan(self, jobs: list[_Job], row_cap: int, seqs: list[list[int]]) -> list[list[_Job]]:
        """Group jobs into batches: a ``[P, R]`` grid of at most ``row_cap`` rows (fused only)."""
        if self.backend == "hf":
            return [[j] for j in jobs]
        batches: list[list[_Job]] = []
        cur: list[_Job] = []
        max_prefix_tokens = max(1, self.max_kv_bytes // self.kv_bytes_per_token)
        for job in jobs:
            cand = cur + [job]
            rows = len(cand) * max(j.rows for j in cand)
            ptoks = len(cand) * max(len(seqs[j.prefix]) for j in cand)
            if cur and (rows > row_cap or ptoks > max_prefix_tokens or any(j.prefix == job.prefix for j in cur)):
                batches.append(cur)
                cand = [job]
            cur = cand
        if cur:
            batches.append(cur)
        return batches

    # ------------------------------------------------------------------ prefill
    def _prefill_many(self, group: list[list[int]], ids: list[int], max_tokens: int = 16384) -> dict[int, _Prefill]:
        """Prefill several prefixes per forward (:meth:`_ModelBound.prefill`, right-padded)."""
        out: dict[int, _Prefill] = {}
        bound = _ModelBound()
        bound._bind_model(self)
        start = 0
        while start < len(group):
            end = start + 1
            while end < len(group) and (end - start + 1) * max(len(x) for x in group[start:end + 1]) <= max_tokens:
                end += 1
            seqs = group[start:end]
            T = max(len(x) for x in seqs)
            inp = torch.full((len(seqs), T), self.pad_token_id, dtype=torch.long)
            for r, x in enumerate(seqs):
                inp[r, : len(x)] = torch.tensor(x)
            inp = inp.to(self.device)
            lens = torch.tensor([len(x) for x in seqs], device=self.device)
            logits, k_all, v_all = bound.prefill(inp, lens, self.kernels == "triton")  # k, v: [L, N, Hkv, T, D]
            for r, x in enumerate(seqs):  # views: [L, Hkv, len, D]
                out[ids[start + r]] = _Prefill(len(x), logits[r], group=(k_all, v_all, r))
            self.stats["prefills"] += len(seqs)
            start = end
        return out

    def _prefill(self, seq: list[int]) -> _Prefill:
        """HF backend: the model's own forward and cache object."""
        ids = torch.tensor([seq], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.stats["prefills"] += 1
        cache = getattr(out, "cache", None) or out.past_key_values
        return _Prefill(len(seq), out.logits[0, -1], cache=cache)

    # ------------------------------------------------------------------ HF backend
    def _decode_hf(
        self,
        batch: list[_Job],
        seqs: list[list[int]],
        prefills: dict[int, _Prefill],
        max_new: int,
        temperature: float,
        gen: torch.Generator,
    ) -> list[list[Completion]]:
        import copy

        (job,) = batch
        pre = prefills[job.prefix]
        rows = job.rows
        cache = copy.deepcopy(pre.cache)  # the cache object is mutated below
        cache.batch_repeat_interleave(rows)
        plen = len(seqs[job.prefix])
        out_tok = torch.zeros(rows + 1, max_new, dtype=torch.long, device=self.device)
        out_lp = torch.zeros(rows + 1, max_new, dtype=torch.float32, device=self.device)
        row_ids = torch.arange(rows, device=self.device)
        alive = torch.ones(rows, dtype=torch.bool, device=self.device)
        logits = pre.logits[None].expand(rows, -1)
        steps = 0
        for step in range(max_new):
            tok, lp = self._sample(logits, temperature, gen)
            out_tok[:, step].index_copy_(0, row_ids, tok)
            out_lp[:, step].index_copy_(0, row_ids, lp)
            alive &= ~self._eos_lut[tok]
            steps = step + 1
            self.stats["decode_steps"] += 1
            self.stats["row_steps"] += int(row_ids.numel())
            if step == max_new - 1:
                break
            if (step + 1) % self.sync_every == 0:
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                if n_alive <= self.compact_below * alive.numel():
                    keep = alive.nonzero()[:, 0]
                    cache.batch_select_indices(keep)
                    self.stats["compactions"] = self.stats.get("compactions", 0) + 1
                    row_ids, alive, tok = row_ids[keep], alive[keep], tok[keep]
            pos = torch.full((tok.numel(), 1), plen + step, dtype=torch.long, device=self.device)
            out = self.model(input_ids=tok[:, None], position_ids=pos, use_cache=True, **{self._cache_kw: cache})
            cache = getattr(out, "cache", None) or out.past_key_values
            logits = out.logits[:, -1]
        return [completions_from_buffers(out_tok[:rows], out_lp[:rows], steps, self.eos_ids)]

    # ------------------------------------------------------------------ fused backend
    def _torch_state(self, batch: list[_Job], prefills: dict[int, _Prefill], max_new: int) -> "_FusedState":
        dev, L, Hkv, D = self.device, self.n_layers, self.n_kv, self.head_dim
        P = len(batch)
        R = max(j.rows for j in batch)
        lens = [prefills[j.prefix].length for j in batch]
        # prefix cache in chunks [L, P, C, Hkv, Lc, D]: on CUDA long prefixes are split in
        # chunks of `prefix_chunk` keys that are attended in parallel, then merged by log-sum-exp
        align = 16 if self.fused_attention else 1
        Lc = -(-max(lens) // align) * align
        if Lc > self.prefix_chunk:
            Lc = -(-self.prefix_chunk // align) * align
        C = -(-max(lens) // Lc)
        pre_k = torch.zeros(L, P, C, Hkv, Lc, D, dtype=self.dtype, device=dev)
        pre_v = torch.zeros_like(pre_k)
        for p, j in enumerate(batch):
            pf = prefills[j.prefix]
            for src, dst in zip(pf.kv(), (pre_k, pre_v)):
                padded = F.pad(src, (0, 0, 0, C * Lc - pf.length))  # [L, Hkv, C*Lc, D]
                dst[:, p] = padded.view(L, Hkv, C, Lc, D).transpose(1, 2)
        lens_t = torch.tensor(lens, device=dev)
        pre_bias = None
        if min(lens) != C * Lc:
            pos = torch.arange(C * Lc, device=dev).view(1, C, 1, 1, Lc)
            pre_bias = torch.zeros(P, C, Hkv, 1, Lc, dtype=self.dtype, device=dev)
            pre_bias.masked_fill_(pos >= lens_t.view(P, 1, 1, 1, 1), _NEG_INF)
        row_plen = lens_t.repeat_interleave(R)
        s_cap = max(1, max_new - 1)
        return _FusedState(self, pre_k, pre_v, pre_bias, row_plen, P, R, s_cap)

    def _slot(self, P: int, R: int, T: int, S: int) -> "_Slot":
        """Static decode buffers (and CUDA graph) for a ``[P, R]`` grid, kept in an LRU."""
        key = (P, R, T, S)
        slot = self._slots.pop(key, None)
        if slot is None:
            while len(self._slots) >= self.graph_cache:
                self._slots.pop(next(iter(self._slots)))
            slot = _Slot(self, P, R, T, S)
        self._slots[key] = slot
        return slot

    def _triton_state(self, batch: list[_Job], prefills: dict[int, _Prefill], max_new: int) -> "_TritonState | None":
        """The Triton decode state of a batch; None (torch kernels from now on) if the kernels
        fail to build or run here and they were not asked for explicitly."""
        P, R = len(batch), max(j.rows for j in batch)
        lens = [prefills[j.prefix].length for j in batch]
        T = _round_up(max(lens), max(64, _pow2(max(lens)) // 8))
        S = _round_up(max(1, max_new - 1), 64)
        try:
            slot = self._slot(P, R, T, S)
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
                    if _is_range(ps) and _is_range(rs):  # the usual case: a strided copy, not an index kernel
                        dst[:, ps[0]:ps[-1] + 1, :, :n].copy_(src[:, rs[0]:rs[-1] + 1, :, :n])
                    else:
                        pi, ri = torch.tensor(ps, device=self.device), torch.tensor(rs, device=self.device)
                        dst[:, pi, :, :n] = src[:, ri, :, :n]
            lens_t = torch.tensor(lens, dtype=torch.int32)
            slot.plen.copy_(lens_t)
            slot.row_plen.copy_(lens_t.repeat_interleave(R))
            state = _TritonState(self, slot)
            state.prepare()
            return state
        except Exception as exc:  # noqa: BLE001 - Triton build/launch errors vary by version
            if self._kernels_forced:
                raise
            import warnings

            warnings.warn(f"Triton decode kernels failed ({type(exc).__name__}: {exc}); using torch kernels",
                          RuntimeWarning, stacklevel=2)
            self.kernels = "torch"
            self._slots.clear()
            return None

    def _decode_fused(
        self,
        batch: list[_Job],
        prefills: dict[int, _Prefill],
        max_new: int,
        temperature: float,
        gen: torch.Generator,
    ) -> list[list[Completion]]:
        dev = self.device
        P = len(batch)
        R = max(j.rows for j in batch)
        state: Any = None
        if self.kernels == "triton":
            state = self._triton_state(batch, prefills, max_new)
        if state is None:
            state = self._torch_state(batch, prefills, max_new)
        # rows: grid [P, R] flattened; row r of job p is sample j.first + r (dead if r >= j.rows)
        n_out = sum(j.rows for j in batch)
        offsets = [0]
        for j in batch:
            offsets.append(offsets[-1] + j.rows)
        grid_out = torch.full((P, R), n_out, dtype=torch.long)  # n_out = dummy row
        for p, j in enumerate(batch):
            grid_out[p, : j.rows] = torch.arange(offsets[p], offsets[p] + j.rows)
        row_out = grid_out.flatten().to(dev)
        alive = row_out < n_out
        out_tok = torch.zeros(n_out + 1, max_new, dtype=torch.long, device=dev)
        out_lp = torch.zeros(n_out + 1, max_new, dtype=torch.float32, device=dev)
        first_logits = torch.stack([prefills[j.prefix].logits for j in batch])  # [P, V]
        logits = first_logits.repeat_interleave(R, dim=0)
        steps = 0
        for step in range(max_new):
            tok, lp = self._sample(logits, temperature, gen)
            out_tok[:, step].index_copy_(0, row_out, tok)
            out_lp[:, step].index_copy_(0, row_out, lp)
            alive &= ~self._eos_lut[tok]
            steps = step + 1
            self.stats["decode_steps"] += 1
            self.stats["row_steps"] += int(row_out.numel())
            if step == max_new - 1:
                break
            if (step + 1) % self.sync_every == 0:
                alive_cpu = alive.cpu()
                n_alive = int(alive_cpu.sum())
                if n_alive == 0:
                    break
                res = state.compact(alive_cpu, step) if n_alive <= self.compact_below * alive_cpu.numel() else None
                if res is not None:
                    keep, pad = res
                    row_out, alive, tok = row_out[keep], alive[keep], tok[keep]
                    row_out[pad] = n_out  # grid padding: dead, writes to the dummy row
                    alive[pad] = False
            logits = state.step(tok, step)
        self.stats["fused_attention"] = float(state._use_fused_attn)
        self.stats["triton_kernels"] = float(isinstance(state, _TritonState))
        comps = completions_from_buffers(out_tok[:n_out], out_lp[:n_out], steps, self.eos_ids)
        return [comps[offsets[p]:offsets[p + 1]] for p in range(P)]


class _FusedWeights:
    """Per-layer weights concatenated for fewer kernels (q|k|v and gate|up in one GEMM each).

    The copies are refreshed whenever a source weight changed (in-place updates bump the tensor
    version counter, so an optimizer step on the model is picked up at the next ``sample``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._key: tuple[Any, ...] | None = None
        self.generation = 0
        self.refresh()

    def _sources(self) -> list[torch.Tensor]:
        out = []
        for layer in self.model.model.layers:
            a, m = layer.self_attn, layer.mlp
            out += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, m.gate_proj.weight, m.up_proj.weight]
            out += [t.bias for t in (a.q_proj, a.k_proj, a.v_proj) if t.bias is not None]
            if hasattr(a, "q_norm"):
                out += [a.q_norm.weight, a.k_norm.weight]
        return out

    def refresh(self) -> None:
        # inference tensors (a model built under torch.inference_mode) cannot change in place: version 0
        key = tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in self._sources())
        if key == self._key:
            return
        first = self._key is None
        self._key = key
        qkv_w, qkv_b, gu_w, qk_norm_w = [], [], [], []
        cfg = self.model.config
        H = cfg.num_attention_heads
        Hkv = getattr(cfg, "num_key_value_heads", None) or H
        frozen = not any(t.requires_grad for t in self._sources())
        with torch.no_grad():
            for layer in self.model.model.layers:
                a, m = layer.self_attn, layer.mlp
                qkv_w.append(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
                bias = [t.bias for t in (a.q_proj, a.k_proj, a.v_proj)]
                qkv_b.append(torch.cat(bias) if all(b is not None for b in bias) else None)
                gu_w.append(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
                if frozen:  # layer by layer, so the peak is one layer's copy
                    _alias_layer(layer, qkv_w[-1], qkv_b[-1], gu_w[-1])
                if hasattr(a, "q_norm"):
                    qk_norm_w.append(torch.cat([a.q_norm.weight[None].expand(H, -1), a.k_norm.weight[None].expand(Hkv, -1)]))
            if not first:  # update in place: captured CUDA graphs keep reading the same memory
                old = [*self.qkv_w, *self.qkv_b, *self.gu_w, *self.qk_norm_w]
                new = [*qkv_w, *qkv_b, *gu_w, *qk_norm_w]
                if len(old) == len(new) and all(
                    (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype)
                    for a, b in zip(old, new)
                ):
                    for a, b in zip(old, new):
                        if a is not None:
                            a.copy_(b)
                    return
            self.generation += 1
            self.qkv_w, self.qkv_b, self.gu_w, self.qk_norm_w = qkv_w, qkv_b, gu_w, qk_norm_w
            if frozen:
                self._key = tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in self._sources())


def _alias_layer(layer: torch.nn.Module, qkv: torch.Tensor, qkv_b: torch.Tensor | None, gu: torch.Tensor) -> None:
    """Make a frozen layer's own q/k/v and gate/up weights views of its fused tensors, so fusing
    costs no memory (a second copy would be half of a 32B model's weights). Models being
    trained keep their own parameters (an optimizer may replace them)."""
    a, m = layer.self_attn, layer.mlp
    for mods, fused, name in (((a.q_proj, a.k_proj, a.v_proj), qkv, "weight"), ((m.gate_proj, m.up_proj), gu, "weight"),
                              ((a.q_proj, a.k_proj, a.v_proj), qkv_b, "bias")):  # fmt: skip
        if fused is None:
            continue
        start = 0
        for mod in mods:
            t = getattr(mod, name)
            t.data = fused[start : start + t.shape[0]]
            start += t.shape[0]


class _ModelBound:
    """The model parts and constants a fused decode state reads (shared by the torch and Triton states)."""

    def _bind_model(self, eng: TorchEngine) -> None:
        self.eng = eng
        base = eng.model.model
        self.layers = base.layers
        self.embed = base.embed_tokens
        self.norm = base.norm
        self.lm_head = eng.model.lm_head
        if eng._weights is None:
            eng._weights = _FusedWeights(eng.model)
        eng._weights.refresh()
        self.w = eng._weights
        self.inv_freq = base.rotary_emb.inv_freq.float().to(eng.device)
        self.rope_scale = float(getattr(base.rotary_emb, "attention_scaling", 1.0))
        self.scaling = float(getattr(self.layers[0].self_attn, "scaling", eng.head_dim ** -0.5))
        self.eps = float(getattr(eng.model.config, "rms_norm_eps", 1e-6))
        self.act = self.layers[0].mlp.act_fn
        self.silu = str(getattr(eng.model.config, "hidden_act", "")) == "silu"

    def _rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [..., D]`` of positions ``pos`` (Hugging Face numerics), with the sign of
        ``rotate_half`` folded into ``sin``: ``rope(x) = x * cos + x.roll(D // 2, -1) * sin``."""
        freqs = pos.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        half = emb.shape[-1] // 2
        cos = (emb.cos() * self.rope_scale).to(dtype)
        sin = emb.sin() * self.rope_scale
        return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).to(dtype)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Hugging Face RMSNorm numerics: normalise in float32, cast, scale."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * weight

    @torch.inference_mode()
    def prefill(self, inp: torch.Tensor, lens: torch.Tensor, triton_kernels: bool) -> tuple[torch.Tensor, ...]:
        """Forward of right-padded prompts ``inp [N, T]`` (real lengths ``lens``), no Hugging Face
        cache: returns the logits at each prompt's last token ``[N, V]`` and the keys / values
        ``[L, N, Hkv, T, D]``, written in place layer by layer (no per-layer cache ``cat``).

        Pads follow the real tokens, so causal attention keeps them out of every real position;
        their keys are masked by length at decode time. Same math as the decode step
        (``triton_kernels``: the decode step's Triton RMSNorm, q/k-norm + rotary, SiLU*up)."""
        eng, w, tk = self.eng, self.w, None
        if triton_kernels:
            from opdlens.rollout import triton_decode as tk
        N, T = inp.shape
        L, H, Hkv, D = eng.n_layers, eng.n_heads, eng.n_kv, eng.head_dim
        k_all = torch.empty(L, N, Hkv, T, D, dtype=eng.dtype, device=inp.device)
        v_all = torch.empty_like(k_all)
        x = self.embed(inp).view(N * T, -1)
        pos = torch.arange(T, device=inp.device)
        cos, sin = self._rope(pos, x.dtype)  # [T, D]
        if tk is not None:
            cos_r, sin_r = cos.repeat(N, 1), sin.repeat(N, 1)  # [N*T, D] (row b = n * T + t)
            kv_tmp = torch.empty(2, N * T, Hkv, 1, D, dtype=eng.dtype, device=inp.device)
            t0 = torch.zeros(1, dtype=torch.long, device=inp.device)

        def add_norm(x: torch.Tensor, delta: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Residual add rounded to the model dtype (as Hugging Face), then RMSNorm."""
            if tk is not None:
                return tk.add_rmsnorm(x, delta, wt, self.eps)
            x = x + delta
            return x, self._rms(x, wt)

        layers = self.layers
        h = tk.rmsnorm(x, layers[0].input_layernorm.weight, self.eps) if tk is not None else self._rms(
            x, layers[0].input_layernorm.weight)
        for li, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = F.linear(h, w.qkv_w[li], w.qkv_b[li])
            qn = attn.q_norm.weight if hasattr(attn, "q_norm") else None
            kn = attn.k_norm.weight if hasattr(attn, "k_norm") else None
            if tk is not None:
                q = tk.qkv_rope(qkv, cos_r, sin_r, qn, kn, kv_tmp[0], kv_tmp[1], t0, H, self.eps).view(N, T, H, D)
                k = kv_tmp[0].view(N, T, Hkv, D)
                v = kv_tmp[1].view(N, T, Hkv, D)
            else:
                qkv4 = qkv.view(N, T, H + 2 * Hkv, D)
                q, k, v = qkv4[:, :, :H], qkv4[:, :, H:H + Hkv], qkv4[:, :, H + Hkv:]
                if qn is not None:
                    q, k = self._rms(q, qn), self._rms(k, kn)
                c, sn = cos[:, None], sin[:, None]
                half = D // 2
                q = torch.addcmul(q * c, q.roll(half, dims=-1), sn)
                k = torch.addcmul(k * c, k.roll(half, dims=-1), sn)
            k_all[li].copy_(k.transpose(1, 2))
            v_all[li].copy_(v.transpose(1, 2))
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k_all[li], v_all[li], is_causal=True,
                                               scale=self.scaling, enable_gqa=Hkv != H)
            x, h = add_norm(x, attn.o_proj(o.transpose(1, 2).reshape(N * T, H * D)), layer.post_attention_layernorm.weight)
            gu = F.linear(h, w.gu_w[li])
            if tk is not None and self.silu:
                a = tk.silu_mul(gu)
            else:
                g, u = gu.chunk(2, dim=-1)
                a = self.act(g) * u
            nxt = layers[li + 1].input_layernorm.weight if li + 1 < len(layers) else self.norm.weight
            x, h = add_norm(x, mlp.down_proj(a), nxt)
        # only the last real token of each prompt feeds the lm_head
        return self.lm_head(h.view(N, T, -1)[torch.arange(N, device=inp.device), lens - 1]), k_all, v_all


class _FusedState(_ModelBound):
    """Buffers and (CUDA-graph) decode step of one fused batch."""

    def __init__(
        self,
        eng: TorchEngine,
        pre_k: torch.Tensor,
        pre_v: torch.Tensor,
        pre_bias: torch.Tensor | None,
        row_plen: torch.Tensor,
        P: int,
        R: int,
        s_cap: int,
    ) -> None:
        self.eng = eng
        self._bind_model(eng)
        self.pre_k, self.pre_v, self.pre_bias = pre_k, pre_v, pre_bias
        self.P, self.R, self.s_cap = P, R, s_cap
        B = P * R
        if eng.device.type == "cuda":
            s_cap = -(-s_cap // 16) * 16  # aligned key length for the fused attention kernel
        shape = (eng.n_layers, B, eng.n_kv, s_cap, eng.head_dim)
        self.suf_k = torch.zeros(shape, dtype=eng.dtype, device=eng.device)
        self.suf_v = torch.zeros_like(self.suf_k)
        self.row_plen = row_plen.clone()
        self.tok_in = torch.zeros(B, dtype=torch.long, device=eng.device)
        self.t_idx = torch.zeros(1, dtype=torch.long, device=eng.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: Any = None
        self._use_fused_attn = eng.fused_attention

    # ------------------------------------------------------------------ step
    def step(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        """Feed ``tok`` (one per row) at suffix slot ``t``; return next logits ``[B, V]``."""
        self.tok_in.copy_(tok)
        self.t_idx.fill_(t)
        if self.eng.device.type == "cuda":
            sb = min(self.suf_k.shape[3], -(-(t + 1) // self.eng.suffix_bucket) * self.eng.suffix_bucket)
        else:
            sb = t + 1
        if not self.eng.cuda_graphs:
            return self._forward(sb)
        if sb not in self._graphs:
            self._graphs[sb] = self._capture(sb)
        graph, out = self._graphs[sb]
        graph.replay()
        return out

    def _capture(self, sb: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        shape = (self.tok_in.numel(), sb, self.pre_k.shape[2], self.pre_k.shape[4])
        if shape not in self.eng._warm_shapes:  # warm-up once per shape (lazy library init)
            side = torch.cuda.Stream(self.eng.device)
            side.wait_stream(torch.cuda.current_stream(self.eng.device))
            with torch.cuda.stream(side):
                self._forward(sb)  # writes the same cache slot the replay will write
            torch.cuda.current_stream(self.eng.device).wait_stream(side)
            self.eng._warm_shapes.add(shape)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(sb)
        self.eng.stats["graphs"] += 1
        return graph, out

    def _forward(self, sb: int) -> torch.Tensor:
        eng, w = self.eng, self.w
        B, H, Hkv, D = self.tok_in.numel(), eng.n_heads, eng.n_kv, eng.head_dim
        G = H // Hkv
        x = self.embed(self.tok_in)  # [B, hidden]
        cos, sin = self._rope(self.row_plen + self.t_idx, x.dtype)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, D]
        half = D // 2
        slots = torch.arange(sb, device=x.device)
        suf_bias = torch.zeros(sb, dtype=torch.float32, device=x.device)
        suf_bias.masked_fill_(slots > self.t_idx, _NEG_INF)
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = self._rms(x, layer.input_layernorm.weight)
            qkv = F.linear(h, w.qkv_w[li], w.qkv_b[li]).view(B, H + 2 * Hkv, D)
            qk, v = qkv[:, : H + Hkv], qkv[:, H + Hkv:]
            if w.qk_norm_w:
                qk = self._rms(qk, w.qk_norm_w[li])
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin)  # rotary embedding of q and k
            q, k = qk[:, :H], qk[:, H:]
            self.suf_k[li].index_copy_(2, self.t_idx, k[:, :, None])
            self.suf_v[li].index_copy_(2, self.t_idx, v[:, :, None])
            o = self._attention(q.reshape(B, Hkv, G, D), li, sb, suf_bias)
            x = x + attn.o_proj(o.reshape(B, H * D))
            gu = F.linear(self._rms(x, layer.post_attention_layernorm.weight), w.gu_w[li])
            g, u = gu.chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(self.act(g) * u)
        return self.lm_head(self._rms(x, self.norm.weight))

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
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, fused: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-causal attention with its log-sum-exp: ``q [N, H, M, D]``, ``k, v [N, H, T, D]``."""
        if self._use_fused_attn and fused:
            try:
                b = None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], bias.shape[-1])
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                    q, k, v, b, True, 0.0, False, scale=self.scaling
                )[:2]
                return out, lse[..., : q.shape[2]]
            except (RuntimeError, NotImplementedError):
                self._use_fused_attn = False  # fall back to the plain version below
        s = torch.matmul(q, k.transpose(-1, -2)).float() * self.scaling
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v)
        return out, lse

    # ------------------------------------------------------------------ compaction
    def compact(self, alive: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop finished rows (and prefixes with none left).

        Returns the kept old row indices of the new ``[P', R']`` grid and its padding mask (device).
        """
        P, R = self.P, self.R
        grid = alive.view(P, R)
        per = grid.sum(1)
        groups = per.nonzero()[:, 0]
        R2 = int(per.max())
        idx, pad = _live_rows(grid, groups, per[groups], R2)
        keep = idx.flatten().to(self.eng.device)
        self.P, self.R = len(groups), R2
        used = t + 1  # slots 0..t are written
        new_k = torch.zeros((self.suf_k.shape[0], keep.numel(), *self.suf_k.shape[2:]), dtype=self.suf_k.dtype, device=keep.device)
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
        self._graphs.clear()
        self._pool = None
        self.eng.stats["compactions"] = self.eng.stats.get("compactions", 0) + 1
        return keep, pad.flatten().to(keep.device)


def _live_rows(grid: torch.Tensor, groups: torch.Tensor, n_live: torch.Tensor, R2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Old row indices of a compacted ``[len(groups), R2]`` grid and its padding mask.

    ``grid [P, R]`` marks live rows; group ``i`` of the new grid takes old group ``groups[i]``'s
    live rows in order, its first ``n_live[i]`` slots are real and the rest (padding, marked
    True) repeat its first live row, so they read valid memory and are then ignored."""
    R = grid.shape[1]
    order = torch.argsort((~grid[groups]).to(torch.int8), dim=1, stable=True)[:, :R2]  # live rows first
    idx = order + groups[:, None] * R
    pad = torch.arange(R2)[None] >= n_live[:, None]
    return torch.where(pad, idx[:, :1], idx), pad


def _is_range(xs: list[int]) -> bool:
    """True if ``xs`` is ``[a, a + 1, ..., b]``."""
    return all(b == a + 1 for a, b in zip(xs, xs[1:]))


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


class _Slot:
    """Static buffers of one decode shape ``(P, R, T, S)`` and its CUDA graph, reused across
    batches and ``sample`` calls (prefix KV ``[L, P, Hkv, T, D]``, suffix KV ``[L, B, Hkv, S, D]``)."""

    def __init__(self, eng: TorchEngine, P: int, R: int, T: int, S: int) -> None:
        dev, dt = eng.device, eng.dtype
        L, Hkv, D = eng.n_layers, eng.n_kv, eng.head_dim
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
        G = eng.n_heads // Hkv
        self.chunk = prefix_chunk(P, Hkv, R * G, T, min(eng.prefix_chunk, 512), n_sm)
        self.graph: Any = None
        self.out: torch.Tensor | None = None
        self.signature: Any = None
        self.warm = False


class _TritonState(_ModelBound):
    """Decode step of one fused batch with the Triton kernels (see :mod:`triton_decode`)."""

    _use_fused_attn = True

    def __init__(self, eng: TorchEngine, slot: _Slot) -> None:
        from opdlens.rollout import triton_decode

        self.tk = triton_decode
        self.eng = eng
        self.slot = slot
        self._bind_model(eng)
        # captured graphs read these addresses: a change (new weights) means a new capture
        self.signature = (self.w.generation, tuple(t.data_ptr() for t in eng.model.parameters()))

    @property
    def P(self) -> int:
        return self.slot.P

    @property
    def R(self) -> int:
        return self.slot.R

    def prepare(self) -> None:
        """Build the kernels (one eager step, also the warm-up before a capture)."""
        s = self.slot
        if not s.warm or (s.graph is not None and s.signature != self.signature):
            s.graph, s.out = None, None
            self._eager()
            s.warm = True

    def _eager(self) -> torch.Tensor:
        if self.eng.device.type != "cuda":
            return self._forward()
        dev = self.eng.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            out = self._forward()
        torch.cuda.current_stream(dev).wait_stream(side)
        return out

    def step(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        """Feed ``tok`` (one per row) at suffix slot ``t``; return next logits ``[B, V]``."""
        s = self.slot
        s.tok_in.copy_(tok)
        s.t_idx.fill_(t)
        if not self.eng.cuda_graphs:
            return self._forward()
        if s.graph is None or s.signature != self.signature:
            if not s.warm:
                self._eager()
                s.warm = True
            graph = torch.cuda.CUDAGraph()
            s.graph = None
            with torch.cuda.graph(graph):
                out = self._forward()
            s.graph, s.out, s.signature = graph, out, self.signature
            self.eng.stats["graphs"] += 1
        s.graph.replay()
        assert s.out is not None
        return s.out

    def _forward(self) -> torch.Tensor:
        eng, w, s, tk = self.eng, self.w, self.slot, self.tk
        B, H, D = s.tok_in.numel(), eng.n_heads, eng.head_dim
        x = self.embed(s.tok_in)  # [B, hidden]
        cos, sin = self._rope(s.row_plen + s.t_idx, x.dtype)  # [B, D]
        layers = self.layers
        h = tk.rmsnorm(x, layers[0].input_layernorm.weight, self.eps)
        for li, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = F.linear(h, w.qkv_w[li], w.qkv_b[li])
            qn = attn.q_norm.weight if hasattr(attn, "q_norm") else None
            kn = attn.k_norm.weight if hasattr(attn, "k_norm") else None
            q = tk.qkv_rope(qkv, cos, sin, qn, kn, s.suf_k[li], s.suf_v[li], s.t_idx, H, self.eps)
            o = tk.decode_attention(q, s.suf_k[li], s.suf_v[li], s.t_idx, s.pre_k[li], s.pre_v[li], s.plen, s.R,
                                    self.scaling, s.mode, s.chunk).view(B, H * D)
            # residual adds fused with the next RMSNorm (plain GEMMs, Hugging Face rounding of the sum)
            x, h = tk.add_rmsnorm(x, attn.o_proj(o), layer.post_attention_layernorm.weight, self.eps)
            gu = F.linear(h, w.gu_w[li])
            if self.silu:
                a = tk.silu_mul(gu)
            else:
                g, u = gu.chunk(2, dim=-1)
                a = self.act(g) * u
            nxt = layers[li + 1].input_layernorm.weight if li + 1 < len(layers) else self.norm.weight
            x, h = tk.add_rmsnorm(x, mlp.down_proj(a), nxt, self.eps)
        return self.lm_head(h)

    def compact(self, alive: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Move the live rows to a smaller grid ``[P', R']`` (R' a power of two where that is
        smaller, P' rounded up to 1/8 of its power of two, so that grids recur and their graphs
        are reused). None if nothing shrinks."""
        P, R = self.P, self.R
        grid = alive.view(P, R)
        per = grid.sum(1)
        groups = per.nonzero()[:, 0]
        most = int(per.max())
        R2 = _pow2(most) if _pow2(most) < R else most
        # groups padded to a recurring count (<= 1/8 more), so the next call's compaction finds
        # its graph; padding groups repeat a live group's prefix and hold only dead rows
        P2 = min(P, _round_up(len(groups), max(1, _pow2(len(groups)) // 8)))
        if P2 == P and R2 == R:
            return None
        n_live = per[groups]
        self.eng.stats["padded_groups"] = self.eng.stats.get("padded_groups", 0) + P2 - len(groups)
        groups = torch.cat([groups, groups[:1].repeat(P2 - len(groups))])
        n_live = torch.cat([n_live, torch.zeros(P2 - len(n_live), dtype=n_live.dtype)])
        idx, pad = _live_rows(grid, groups, n_live, R2)
        old = self.slot
        keep = idx.flatten().to(self.eng.device)
        g = groups.to(self.eng.device)
        new = self.eng._slot(P2, R2, old.T, old.S)
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
