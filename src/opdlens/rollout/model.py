"""The decoder of a Llama-family model as the fused engine runs it: one block forward over a
small table of ops (PyTorch or Triton), used by the prefill and by every decode state.

A forward is ``embed -> [RMSNorm -> q|k|v GEMM -> q/k norm + rotary + K/V write -> attention ->
o-proj -> add + RMSNorm -> gate|up GEMM -> SiLU * up -> down -> add + RMSNorm] x L -> lm_head``.
Only two things vary: the ops (:class:`TorchOps` or :class:`TritonOps`, same numerics as Hugging
Face) and where K/V go and how attention reads them, which the caller passes in (the prefill's
causal attention, or a decode state's shared-prefix + own-suffix attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from opdlens.policy import attention_backends

FUSED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

# the cache a layer's K/V are written to: (k_cache [B, Hkv, S, D], v_cache, slot index [1])
KVSlot = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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


class FusedWeights:
    """Per-layer weights concatenated for fewer kernels (q|k|v and gate|up in one GEMM each).

    The copies are refreshed whenever a source weight changed (in-place updates bump the tensor
    version counter, so an optimizer step on the model is picked up at the next ``sample``). A
    frozen model (no parameter requires grad) shares the memory: its own weights become views of
    the fused tensors."""

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
                    qk_norm_w.append(
                        torch.cat([a.q_norm.weight[None].expand(H, -1), a.k_norm.weight[None].expand(Hkv, -1)])
                    )
            if not first:  # update in place: captured CUDA graphs keep reading the same memory
                old = [*self.qkv_w, *self.qkv_b, *self.gu_w, *self.qk_norm_w]
                new = [*qkv_w, *qkv_b, *gu_w, *qk_norm_w]
                if len(old) == len(new) and all(
                    (a is None and b is None)
                    or (a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype)
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
    for mods, fused, name in (
        ((a.q_proj, a.k_proj, a.v_proj), qkv, "weight"),
        ((m.gate_proj, m.up_proj), gu, "weight"),
        ((a.q_proj, a.k_proj, a.v_proj), qkv_b, "bias"),
    ):
        if fused is None:
            continue
        start = 0
        for mod in mods:
            t = getattr(mod, name)
            t.data = fused[start : start + t.shape[0]]
            start += t.shape[0]


class TorchOps:
    """The block's elementwise ops in PyTorch (Hugging Face numerics; CPU and CUDA)."""

    def __init__(self, m: BoundModel) -> None:
        self.m = m

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Normalise in float32, cast, scale (as Hugging Face's RMSNorm)."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.m.eps).to(x.dtype) * weight

    def add_rmsnorm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add (rounded to the model dtype) and the RMSNorm of the sum."""
        x = x + delta
        return x, self.rmsnorm(x, weight)

    def act_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up`` of ``gu = gate | up``."""
        g, u = gu.chunk(2, dim=-1)
        return self.m.act(g) * u

    def qkv_rope(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, li: int, kv: KVSlot) -> torch.Tensor:
        """``qkv [B, (H + 2 Hkv) * D]`` -> rotated ``q [B, H, D]``; the rotated k and the v are
        written to slot ``kv[2]`` of ``kv[0], kv[1] [B, Hkv, S, D]`` (q/k RMSNorm first, Qwen3)."""
        m = self.m
        H, Hkv, D = m.n_heads, m.n_kv, m.head_dim
        qkv = qkv.view(-1, H + 2 * Hkv, D)
        qk, v = qkv[:, : H + Hkv], qkv[:, H + Hkv :]
        if m.w.qk_norm_w:
            qk = self.rmsnorm(qk, m.w.qk_norm_w[li])
        qk = torch.addcmul(qk * cos[:, None], qk.roll(D // 2, dims=-1), sin[:, None])
        k_cache, v_cache, t = kv
        k_cache.index_copy_(2, t, qk[:, H:, None])
        v_cache.index_copy_(2, t, v[:, :, None])
        return qk[:, :H].contiguous()


class TritonOps(TorchOps):
    """The same ops as fused Triton kernels (:mod:`opdlens.rollout.triton_decode`, CUDA or the
    Triton interpreter)."""

    def __init__(self, m: BoundModel) -> None:
        super().__init__(m)
        from opdlens.rollout import triton_decode

        self.tk = triton_decode

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.tk.rmsnorm(x, weight, self.m.eps)

    def add_rmsnorm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tk.add_rmsnorm(x, delta, weight, self.m.eps)

    def act_mul(self, gu: torch.Tensor) -> torch.Tensor:
        return self.tk.silu_mul(gu) if self.m.silu else super().act_mul(gu)

    def qkv_rope(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, li: int, kv: KVSlot) -> torch.Tensor:
        attn = self.m.layers[li].self_attn
        qn = attn.q_norm.weight if hasattr(attn, "q_norm") else None
        kn = attn.k_norm.weight if hasattr(attn, "k_norm") else None
        return self.tk.qkv_rope(qkv, cos, sin, qn, kn, kv[0], kv[1], kv[2], self.m.n_heads, self.m.eps)


class BoundModel:
    """The model parts, shapes and constants the fused engine reads, and its one block forward."""

    def __init__(self, model: torch.nn.Module, device: torch.device, triton_kernels: bool) -> None:
        cfg = model.config
        base = model.model
        self.layers = base.layers
        self.embed = base.embed_tokens
        self.norm = base.norm
        self.lm_head = model.lm_head
        self.w = FusedWeights(model)
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.dtype = next(model.parameters()).dtype
        self.inv_freq = base.rotary_emb.inv_freq.float().to(device)
        self.rope_scale = float(getattr(base.rotary_emb, "attention_scaling", 1.0))
        self.scaling = float(getattr(self.layers[0].self_attn, "scaling", self.head_dim**-0.5))
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.act = self.layers[0].mlp.act_fn
        self.silu = str(getattr(cfg, "hidden_act", "")) == "silu"
        self.triton = triton_kernels
        self.ops: TorchOps = TritonOps(self) if triton_kernels else TorchOps(self)
        self.params = list(model.parameters())

    def signature(self) -> tuple[Any, ...]:
        """Changes when a captured CUDA graph would read stale weight addresses."""
        return (self.w.generation, tuple(t.data_ptr() for t in self.params))

    def rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [..., D]`` of positions ``pos`` (Hugging Face numerics), with the sign of
        ``rotate_half`` folded into ``sin``: ``rope(x) = x * cos + x.roll(D // 2, -1) * sin``."""
        freqs = pos.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        half = emb.shape[-1] // 2
        cos = (emb.cos() * self.rope_scale).to(dtype)
        sin = emb.sin() * self.rope_scale
        return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).to(dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: Callable[[int], KVSlot],
        attend: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """All blocks over hidden states ``x [B, hidden]`` at rotary ``cos, sin [B, D]``:
        ``kv(layer)`` says where the layer's new K/V go, ``attend(layer, q [B, H, D])`` returns
        its attention output ``[B, H * D]``. Returns the final normed hidden states (the lm_head
        input)."""
        ops, w, layers = self.ops, self.w, self.layers
        h = ops.rmsnorm(x, layers[0].input_layernorm.weight)
        for li, layer in enumerate(layers):
            qkv = F.linear(h, w.qkv_w[li], w.qkv_b[li])
            q = ops.qkv_rope(qkv, cos, sin, li, kv(li))
            x, h = ops.add_rmsnorm(x, layer.self_attn.o_proj(attend(li, q)), layer.post_attention_layernorm.weight)
            a = ops.act_mul(F.linear(h, w.gu_w[li]))
            nxt = layers[li + 1].input_layernorm.weight if li + 1 < len(layers) else self.norm.weight
            x, h = ops.add_rmsnorm(x, layer.mlp.down_proj(a), nxt)
        return h

    @torch.inference_mode()
    def prefill(self, inp: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward of right-padded prompts ``inp [N, T]`` (real lengths ``lens``), no Hugging Face
        cache: returns the logits at each prompt's last token ``[N, V]`` and the keys / values
        ``[L, N, Hkv, T, D]``, written in place layer by layer.

        Every prompt token is a row of the block forward whose K/V cache has one slot; causal
        attention over the prompt then reads them from ``[L, N, Hkv, T, D]``. Pads follow the real
        tokens, so causal attention keeps them out of every real position; their keys are masked
        by length at decode time."""
        N, T = inp.shape
        L, H, Hkv, D = self.n_layers, self.n_heads, self.n_kv, self.head_dim
        k_all = torch.empty(L, N, Hkv, T, D, dtype=self.dtype, device=inp.device)
        v_all = torch.empty_like(k_all)
        x = self.embed(inp).view(N * T, -1)
        cos, sin = self.rope(torch.arange(T, device=inp.device), x.dtype)  # [T, D]
        cos, sin = cos.repeat(N, 1), sin.repeat(N, 1)  # [N*T, D] (row b = n * T + t)
        kv_tmp = torch.empty(2, N * T, Hkv, 1, D, dtype=self.dtype, device=inp.device)
        slot: KVSlot = (kv_tmp[0], kv_tmp[1], torch.zeros(1, dtype=torch.long, device=inp.device))

        def attend(li: int, q: torch.Tensor) -> torch.Tensor:
            k_all[li].copy_(kv_tmp[0].view(N, T, Hkv, D).transpose(1, 2))
            v_all[li].copy_(kv_tmp[1].view(N, T, Hkv, D).transpose(1, 2))
            o = F.scaled_dot_product_attention(
                q.view(N, T, H, D).transpose(1, 2),
                k_all[li],
                v_all[li],
                is_causal=True,
                scale=self.scaling,
                enable_gqa=Hkv != H,
            )
            return o.transpose(1, 2).reshape(N * T, H * D)

        with attention_backends():  # prefill lengths change from call to call
            h = self.forward(x, cos, sin, lambda li: slot, attend)
        # only the last real token of each prompt feeds the lm_head
        return self.lm_head(h.view(N, T, -1)[torch.arange(N, device=inp.device), lens - 1]), k_all, v_all
