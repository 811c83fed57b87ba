"""The PyTorch reference OpenELM, read side by side with `openelm_mlx/model.py` (same names, same order).

Follows Apple's Hugging Face `modeling_openelm.py` and corenet `general_gpt.py`, including CoreNet's init.
State-dict keys are the HF ones, so Apple's `modeling_openelm.py` would load our checkpoints strictly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LayerPlan, OpenELMConfig, layer_plan

RMS_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = RMS_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in float32, cast back, then scale (Apple's order)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rope_cos_sin(head_dim: int, positions: torch.Tensor, base: float):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (L, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, head_dim): rotate-half layout
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).type_as(x)


class KVCache:
    """Per-layer keys and values; `offset` is the number of positions already cached."""

    def __init__(self):
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    @property
    def offset(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor):
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys, k], dim=2)
            self.values = torch.cat([self.values, v], dim=2)
        return self.keys, self.values


class Attention(nn.Module):
    def __init__(self, cfg: OpenELMConfig, plan: LayerPlan):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.n_q, self.n_kv = plan.num_query_heads, plan.num_kv_heads
        self.rope_base = float(cfg.rope_freq_constant)
        self.qkv_proj = nn.Linear(cfg.model_dim, (self.n_q + 2 * self.n_kv) * cfg.head_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim)
        self.k_norm = RMSNorm(cfg.head_dim)
        self.out_proj = nn.Linear(self.n_q * cfg.head_dim, cfg.model_dim, bias=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).view(B, L, self.n_q + 2 * self.n_kv, self.head_dim)
        qkv = qkv.transpose(1, 2)  # (B, heads, L, head_dim); rows are [Q | K | V]
        q, k, v = qkv.split([self.n_q, self.n_kv, self.n_kv], dim=1)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm before RoPE
        offset = cache.offset if cache is not None else 0
        cos, sin = rope_cos_sin(self.head_dim, torch.arange(offset, offset + L, device=x.device), self.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        groups = self.n_q // self.n_kv
        k = k.repeat_interleave(groups, dim=1)  # query head h reads KV head h // groups
        v = v.repeat_interleave(groups, dim=1)
        if mask is None and cache is None:
            # Full causal pass (training): is_causal lets SDPA pick its flash / memory-efficient kernels.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Bottom-right aligned causal mask: SDPA's is_causal is top-left aligned, wrong with a cache.
            mask = causal_mask(L, k.shape[2], x.device) if mask is None else mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, -1))


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where attention is allowed; queries are the last q_len positions."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos


class FeedForward(nn.Module):
    def __init__(self, cfg: OpenELMConfig, plan: LayerPlan):
        super().__init__()
        self.proj_1 = nn.Linear(cfg.model_dim, 2 * plan.ffn_dim, bias=False)
        self.proj_2 = nn.Linear(plan.ffn_dim, cfg.model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.proj_1(x).chunk(2, dim=-1)  # gate is the first half of the rows
        return self.proj_2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: OpenELMConfig, plan: LayerPlan):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.model_dim)
        self.attn = Attention(cfg, plan)
        self.ffn_norm = RMSNorm(cfg.model_dim)
        self.ffn = FeedForward(cfg, plan)

    def forward(self, x, mask=None, cache=None):
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: OpenELMConfig):
        super().__init__()
        self.token_embeddings = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.layers = nn.ModuleList([TransformerBlock(cfg, plan) for plan in layer_plan(cfg)])
        self.norm = RMSNorm(cfg.model_dim)

    def forward(self, input_ids, cache=None, mask=None, checkpoint_layers: bool = False):
        h = self.token_embeddings(input_ids)
        cache = cache if cache is not None else [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            if checkpoint_layers and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, mask, c, use_reentrant=False)
            else:
                h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    """OpenELM for causal LM; `forward(input_ids, cache=None) -> logits` like the MLX model."""

    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.checkpoint_layers = False  # activation checkpointing, set by the trainer

    def forward(self, input_ids: torch.Tensor, cache=None, mask=None) -> torch.Tensor:
        h = self.transformer(input_ids, cache, mask, self.checkpoint_layers)
        return F.linear(h, self.transformer.token_embeddings.weight)  # tied head

    @property
    def layers(self):
        return self.transformer.layers

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None):
        """CoreNet's init: Linear N(0, in^-1/2), embedding N(0, D^-1/2), then out_proj and proj_2
        re-drawn N(0, D^-1/2 (2L)^-1/2); norms to one."""
        d, n_layers = self.config.model_dim, self.config.num_transformer_layers
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5, generator=generator)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, d**-0.5, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        residual_std = d**-0.5 * (2 * n_layers) ** -0.5
        for layer in self.layers:
            layer.attn.out_proj.weight.normal_(0.0, residual_std, generator=generator)
            layer.ffn.proj_2.weight.normal_(0.0, residual_std, generator=generator)


def build_model(config: OpenELMConfig, seed: Optional[int] = 0) -> Model:
    """A reference model with CoreNet's init drawn from `seed` (deterministic across runs)."""
    model = Model(config)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model.reset_parameters(generator)
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


