"""Shared-prefix batched sampling with PyTorch, on CPU and CUDA: :class:`TorchEngine`.

A ``sample(prefixes, n, max_new_tokens)`` call (``n`` samples of each prefix, or ``n[i]`` of
prefix ``i``) is planned into batches (``[P, R]`` grids: up to ``R`` rows of each of ``P``
prefixes, the rest dead, at most ``max_batch_rows`` rows and a KV-memory bound), each
prefix is prefilled once, and every batch runs through **one** decode loop: sample a token per
row, record it, mark rows that hit EOS, every ``sync_every`` steps drop finished rows once the
live fraction falls under ``compact_below`` (compaction), feed the tokens to the batch's decode
state. The settings are an :class:`~opdlens.rollout.base.EngineConfig`.

Backends (the decode states of :mod:`opdlens.rollout.decode`):

``"fused"`` (Llama-family models: ``llama``, ``qwen2``, ``qwen3``)
    The engine's own forward (:mod:`opdlens.rollout.model`): each prefix is prefilled once and its
    KV cache stored **once**, shared by all its rows; a decode step attends to the shared prefix
    cache and to each row's own suffix cache, merged by log-sum-exp, so an 8K-token prefix with 100
    rows costs one 8K cache. Kernels: ``"triton"`` (fused Triton kernels, the CUDA default; one
    CUDA graph per decode shape kept across calls) or ``"torch"`` (PyTorch ops, the CPU default;
    on CUDA one graph per suffix-length bucket).

``"hf"`` (any causal LM)
    One prefix at a time: Hugging Face prefill, KV cache repeated to the prefix's rows, decode
    with ``past_key_values``.

Sampling: Gumbel-max in PyTorch (CPU default) or an inverse-CDF Triton kernel (CUDA default),
from a ``torch.Generator`` seeded by ``seed``: same seed and same settings, same completions.
Truncated sampling (``top_p``, ``top_k``, ``min_p``; :mod:`opdlens.sampling`) sets the dropped
tokens' logits to ``-inf`` with torch ops before either sampler draws (outside the CUDA graphs,
which hold the model's forward only).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from pydantic import ValidationError

from opdlens.errors import OpdlensError
from opdlens.policy import Completion, TokenSeq
from opdlens.rollout.base import (
    EngineConfig,
    Sampler,
    completions_from_buffers,
    make_generator,
    sample_tokens,
    truncating,
    validate_request,
)
from opdlens.rollout.decode import DecodeState, HFState, Job, Prefill, TorchState
from opdlens.rollout.model import FUSED_MODEL_TYPES, BoundModel, fused_supported
from opdlens.rollout.triton_state import SlotCache, TritonState
from opdlens.sampling import Truncation

__all__ = ["FUSED_MODEL_TYPES", "EngineConfig", "TorchEngine", "fused_supported"]


class TorchEngine:
    """Sampling engine over a Hugging Face causal LM (see the module docstring).

    ``config`` holds the settings; keyword ``overrides`` replace single fields of it
    (``TorchEngine(model, eos, pad, "cuda", max_batch_rows=512)``). Every choice that depends on
    the device or the model (backend, kernels, sampler) is made here, once."""

    def __init__(
        self,
        model: torch.nn.Module,
        eos_token_ids: Iterable[int],
        pad_token_id: int,
        device: str | torch.device | None = None,
        config: EngineConfig | None = None,
        **overrides: Any,
    ) -> None:
        cfg = config or EngineConfig()
        if overrides:
            try:
                cfg = EngineConfig.model_validate({**cfg.model_dump(), **overrides})
            except ValidationError as exc:
                msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise OpdlensError(f"bad engine setting(s): {msgs}") from None
        self.config = cfg
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.eos_ids = frozenset(int(e) for e in eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.dtype = next(model.parameters()).dtype
        is_cuda = self.device.type == "cuda"
        self.max_kv_bytes = cfg.max_kv_bytes or (
            int(0.4 * torch.cuda.mem_get_info(self.device)[0]) if is_cuda else 2 << 30
        )
        self.cuda_graphs = is_cuda if cfg.cuda_graphs is None else (cfg.cuda_graphs and is_cuda)
        self.sync_every = cfg.sync_every or (16 if is_cuda else 1)
        self.fused_attention = cfg.fused_attention and is_cuda
        self.backend = self._pick_backend(cfg.backend)
        self.kernels = self._pick_kernels(cfg.kernels)
        self._sample, self.sampler = self._pick_sampler(cfg.sampler)
        vocab = model.get_output_embeddings().weight.shape[0]
        self._eos_lut = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        if self.eos_ids:
            self._eos_lut[torch.tensor(sorted(self.eos_ids), device=self.device)] = True
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cfg_m = model.config
        n_heads = int(cfg_m.num_attention_heads)
        self.n_layers = int(cfg_m.num_hidden_layers)
        self.n_kv = int(getattr(cfg_m, "num_key_value_heads", None) or n_heads)
        self.head_dim = int(getattr(cfg_m, "head_dim", None) or cfg_m.hidden_size // n_heads)
        self.bound = BoundModel(model, self.device, self.kernels == "triton") if self.backend == "fused" else None
        self.slots = SlotCache(cfg.graph_cache, self.max_kv_bytes)  # triton kernels: decode buffers + graphs by shape
        self.warm_shapes: set[tuple[int, ...]] = set()  # torch kernels: shapes already run once eagerly
        self.stats: dict[str, float] = {}
        self.timing = False  # benchmarks: record stats["prefill_s"] (adds device syncs)

    def free_caches(self) -> None:
        """Drop the decode buffers and CUDA graphs kept across calls (:class:`SlotCache`: up to
        ``max_kv_bytes`` of KV buffers); the next call builds what it needs again. The model
        schedule calls it before loading another model beside this one."""
        self.slots = SlotCache(self.config.graph_cache, self.max_kv_bytes)

    # ------------------------------------------------------------------ choices made once
    def _pick_backend(self, backend: str) -> str:
        reason = fused_supported(self.model)
        if backend == "auto":
            return "fused" if reason is None else "hf"
        if backend == "fused" and reason is not None:
            raise OpdlensError(f"the fused backend cannot run this model ({reason}); use backend='hf'")
        return backend

    def _pick_kernels(self, kernels: str) -> str:
        from opdlens.rollout import triton_decode

        if kernels == "triton" and not triton_decode.available():
            raise OpdlensError("kernels='triton' needs Triton (pip install triton), or set kernels='torch'")
        if self.backend != "fused":
            return "torch"  # the hf backend runs the model's own modules
        if kernels == "auto":
            return "triton" if self.device.type == "cuda" and triton_decode.available() else "torch"
        return kernels

    def _pick_sampler(self, sampler: str) -> tuple[Sampler, str]:
        """Gumbel-max in PyTorch, or the inverse-CDF Triton kernel (CUDA; checked once here)."""
        from opdlens.rollout import triton_sampler

        if sampler == "torch" or (
            sampler == "auto" and not (self.device.type == "cuda" and triton_sampler.available())
        ):
            return sample_tokens, "torch"
        if self.device.type != "cuda":
            raise OpdlensError("the triton sampler needs a CUDA device; set sampler='torch'")
        gen = make_generator(self.device, 0)
        x = torch.randn(3, 5000, device=self.device, generator=gen).to(self.dtype) * 3
        tok, lp = triton_sampler.sample_tokens_triton(x, 0.7, gen)
        ref = torch.log_softmax(x.float() / 0.7, -1).gather(1, tok[:, None])[:, 0]
        if not bool(((lp - ref).abs() < 1e-4).all()):
            raise OpdlensError(
                f"the triton sampler fails its self-check here ({lp.tolist()} vs {ref.tolist()}); set sampler='torch'"
            )
        return triton_sampler.sample_tokens_triton, "triton"

    # ------------------------------------------------------------------ public API
    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv * self.head_dim * torch.finfo(self.dtype).bits // 8

    @torch.inference_mode()
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
        """``n`` continuations of each prefix (``n[i]`` of prefix ``i`` when a sequence), planned
        into batches together (see :meth:`_jobs` and :meth:`_plan`), each token drawn from the
        truncated distribution of :func:`opdlens.sampling.sampling_log_probs` by the engine's
        sampler (PyTorch or Triton)."""
        seqs, counts = validate_request(prefixes, n, max_new_tokens, temperature)
        sampler = truncating(self._sample, Truncation(top_p, top_k, min_p))
        result: list[list[Completion]] = [[Completion([], [], False) for _ in range(c)] for c in counts]
        if max_new_tokens == 0 or not seqs:
            return result
        gen = make_generator(self.device, seed)
        self.stats = {"decode_steps": 0, "row_steps": 0, "prefills": 0, "graphs": 0, "batches": 0}
        if self.bound is not None:
            self.bound.w.refresh()  # weights changed in place since the last call (training)
        row_cap = max(
            1, min(self.config.max_batch_rows, self.max_kv_bytes // max(1, max_new_tokens * self.kv_bytes_per_token))
        )
        jobs = self._jobs(seqs, counts, row_cap)
        remaining: dict[int, int] = {}  # jobs left per prefix (to drop its prefill)
        for j in jobs:
            remaining[j.prefix] = remaining.get(j.prefix, 0) + 1
        prefills: dict[int, Prefill] = {}
        for batch in self._plan(jobs, row_cap, seqs):
            self.stats["batches"] += 1
            todo = list(dict.fromkeys(j.prefix for j in batch if j.prefix not in prefills))
            t0 = self._clock()
            prefills.update(self._prefill([seqs[i] for i in todo], todo))
            if t0 is not None:
                self.stats["prefill_s"] = self.stats.get("prefill_s", 0.0) + self._clock() - t0  # type: ignore[operator]
            comps = self._decode(batch, prefills, max_new_tokens, temperature, gen, sampler)
            for job, cs in zip(batch, comps):
                result[job.prefix][job.first : job.first + job.rows] = cs
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
        return time.perf_counter()

    # ------------------------------------------------------------------ planning
    @staticmethod
    def _jobs(seqs: list[list[int]], counts: list[int], row_cap: int) -> list[Job]:
        """Each prefix's samples as jobs of at most ``row_cap`` rows, prefixes in decreasing
        order of their count (so that a batch's ``[P, R]`` grid, ``R`` its largest job, has few
        dead rows), then increasing length. With one count for all prefixes the order is by
        length alone."""
        order = sorted(range(len(seqs)), key=lambda i: (-min(counts[i], row_cap), len(seqs[i])))
        return [Job(i, s, min(row_cap, counts[i] - s)) for i in order for s in range(0, counts[i], row_cap)]

    def _plan(self, jobs: list[Job], row_cap: int, seqs: list[list[int]]) -> list[list[Job]]:
        """Group jobs into batches: a ``[P, R]`` grid of at most ``row_cap`` rows (fused only)."""
        if self.backend == "hf":
            return [[j] for j in jobs]
        batches: list[list[Job]] = []
        cur: list[Job] = []
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
    def _prefill(self, seqs: list[list[int]], ids: list[int], max_tokens: int = 16384) -> dict[int, Prefill]:
        """Prefill prefixes ``seqs`` (request indices ``ids``). Fused: several right-padded
        prompts per forward (:meth:`BoundModel.prefill`); hf: the model's forward, one each."""
        out: dict[int, Prefill] = {}
        if self.bound is None:
            for i, seq in zip(ids, seqs):
                res = self.model(
                    input_ids=torch.tensor([seq], dtype=torch.long, device=self.device),
                    use_cache=True,
                    logits_to_keep=1,
                )
                out[i] = Prefill(len(seq), res.logits[0, -1], cache=getattr(res, "cache", None) or res.past_key_values)
            self.stats["prefills"] += len(seqs)
            return out
        start = 0
        while start < len(seqs):
            end = start + 1
            while end < len(seqs) and (end - start + 1) * max(len(x) for x in seqs[start : end + 1]) <= max_tokens:
                end += 1
            group = seqs[start:end]
            T = max(len(x) for x in group)
            inp = torch.full((len(group), T), self.pad_token_id, dtype=torch.long)
            for r, x in enumerate(group):
                inp[r, : len(x)] = torch.tensor(x)
            lens = torch.tensor([len(x) for x in group], device=self.device)
            logits, k_all, v_all = self.bound.prefill(inp.to(self.device), lens)  # k, v: [L, N, Hkv, T, D]
            for r, x in enumerate(group):  # views: [L, Hkv, len, D]
                out[ids[start + r]] = Prefill(len(x), logits[r], group=(k_all, v_all, r))
            self.stats["prefills"] += len(group)
            start = end
        return out

    # ------------------------------------------------------------------ the decode loop
    def _state(
        self, batch: list[Job], prefills: dict[int, Prefill], max_new: int
    ) -> tuple[DecodeState, list[Job], int]:
        """The batch's decode state, the jobs of its grid (the batch, maybe padded with empty
        jobs) and its rows per prefix."""
        if self.backend == "hf":
            (job,) = batch
            return HFState(self, prefills[job.prefix], job.rows), batch, job.rows
        cls = TritonState if self.kernels == "triton" else TorchState
        grid, R = cls.grid(batch)
        return cls(self, grid, R, prefills, max_new), grid, R

    def _decode(
        self,
        batch: list[Job],
        prefills: dict[int, Prefill],
        max_new: int,
        temperature: float,
        gen: torch.Generator,
        sampler: Sampler | None = None,
    ) -> list[list[Completion]]:
        """Sample ``max_new`` tokens for every row of ``batch`` (a ``[P, R]`` grid; row ``r`` of job
        ``p`` is sample ``j.first + r``, dead if ``r >= j.rows``); completions per job."""
        dev = self.device
        state, grid, R = self._state(batch, prefills, max_new)
        offsets = [0]
        for j in grid:
            offsets.append(offsets[-1] + j.rows)
        n_out = offsets[-1]
        grid_out = torch.full((len(grid), R), n_out, dtype=torch.long)  # n_out = dummy row
        for p, j in enumerate(grid):
            grid_out[p, : j.rows] = torch.arange(offsets[p], offsets[p] + j.rows)
        row_out = grid_out.flatten().to(dev)
        alive = row_out < n_out
        out_tok = torch.zeros(n_out + 1, max_new, dtype=torch.long, device=dev)
        out_lp = torch.zeros(n_out + 1, max_new, dtype=torch.float32, device=dev)
        first = torch.stack([prefills[j.prefix].logits for j in grid])  # [P, V]
        logits = first.repeat_interleave(R, dim=0)
        steps = 0
        sample = sampler or self._sample
        for step in range(max_new):
            tok, lp = sample(logits, temperature, gen)
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
                res = (
                    state.compact(alive_cpu, step) if n_alive <= self.config.compact_below * alive_cpu.numel() else None
                )
                if res is not None:
                    keep, pad = res
                    row_out, alive, tok = row_out[keep], alive[keep], tok[keep]
                    row_out[pad] = n_out  # grid padding: dead, writes to the dummy row
                    alive[pad] = False
            logits = state.step(tok, step)
        if self.backend == "fused":
            self.stats["fused_attention"] = float(self.fused_attention and self.kernels == "torch")
            self.stats["triton_kernels"] = float(self.kernels == "triton")
        comps = completions_from_buffers(out_tok[:n_out], out_lp[:n_out], steps, self.eos_ids)
        return [comps[offsets[p] : offsets[p + 1]] for p in range(len(batch))]
