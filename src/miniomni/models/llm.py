"""Decoder-only transformer of the Qwen2 / Llama family with a preallocated KV cache.

Pre-norm blocks: RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual. q/k/v are one fused linear laid out as
``[all queries; all keys; all values]``; query head ``h`` uses key/value group
``h // (n_head / n_query_groups)`` (the Hugging Face convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OmniConfig
from ..cooperative import Steps, run


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, cast back, then scaled."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; also the Whisper-to-LLM audio adapter.

    ``gate_up`` (int8 activations, see :mod:`miniomni.int8act`) computes gate and up in one product.
    """

    gate_up = None

    def __init__(self, in_features: int, hidden: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.gate = nn.Linear(in_features, hidden, bias=bias)
        self.up = nn.Linear(in_features, hidden, bias=bias)
        self.down = nn.Linear(hidden, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and self.gate_up.takes(x):
            from ..int8act import swiglu_gate_up

            return self.down(swiglu_gate_up(self.gate_up, x))
        return self.down(F.silu(self.gate(x)) * self.up(x))


def rope_cache(length: int, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (length, head_size), float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq).repeat(1, 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by the (B or 1, 1, T, D) tables, rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# Groups of batch rows, each with the number of cache positions it reads (see forward_hidden).
KVSegments = list[tuple[slice, int]]


@dataclass
class KVCache:
    """Preallocated keys and values, one (B, n_query_groups, max_length, head_size) pair per layer."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    def rows(self, rows: slice) -> KVCache:
        """The cache restricted to some rows (views: writes land in this cache)."""
        return KVCache(keys=[k[rows] for k in self.keys], values=[v[rows] for v in self.values])


class Attention(nn.Module):
    def __init__(self, config: OmniConfig) -> None:
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.n_embd, config.qkv_size, bias=config.add_qkv_bias)
        self.out = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        kv_len: int | KVSegments,
    ) -> torch.Tensor:
        cfg = self.config
        batch, length, _ = x.shape
        hs, n_head, n_kv = cfg.head_size, cfg.n_head, cfg.n_query_groups
        q, k, v = self.qkv(x).split((n_head * hs, n_kv * hs, n_kv * hs), dim=-1)
        q = apply_rope(q.view(batch, length, n_head, hs).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(batch, length, n_kv, hs).transpose(1, 2), cos, sin)
        v = v.view(batch, length, n_kv, hs).transpose(1, 2)

        if cache is None:
            # Plain causal pass (training, parity checks): expand the groups.
            if n_kv != n_head:
                k = k.repeat_interleave(cfg.q_per_kv, dim=1)
                v = v.repeat_interleave(cfg.q_per_kv, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and length > 1)
            return self.out(y.transpose(1, 2).reshape(batch, length, n_head * hs))

        cache_k, cache_v = cache
        if positions.dim() == 1:
            cache_k.index_copy_(2, positions, k.to(cache_k.dtype))
            cache_v.index_copy_(2, positions, v.to(cache_v.dtype))
        else:
            rows = torch.arange(batch, device=x.device).unsqueeze(1)
            cache_k[rows, :, positions] = k.transpose(1, 2).to(cache_k.dtype)
            cache_v[rows, :, positions] = v.transpose(1, 2).to(cache_v.dtype)
        # Fold each group's queries into the sequence axis so K/V are never copied per head.
        q = q.reshape(batch, n_kv, cfg.q_per_kv * length, hs)
        if isinstance(kv_len, int):
            k, v = cache_k[:, :, :kv_len], cache_v[:, :, :kv_len]
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        else:  # each group of rows reads its own cache length, as it would alone; other rows stay idle
            y = q.new_zeros(q.shape)
            for rows, length_read in kv_len:
                k, v = cache_k[rows, :, :length_read], cache_v[rows, :, :length_read]
                y[rows] = F.scaled_dot_product_attention(q[rows], k.to(q.dtype), v.to(q.dtype),
                                                         attn_mask=mask[rows, ..., :length_read].contiguous())
        y = y.reshape(batch, n_head, length, hs).transpose(1, 2).reshape(batch, length, n_head * hs)
        return self.out(y)


class Block(nn.Module):
    def __init__(self, config: OmniConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x, cos, sin, mask, positions, cache, kv_len) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, positions, cache, kv_len)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The backbone: embedding table, blocks, final norm and the full-vocabulary head."""

    def __init__(self, config: OmniConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_rope()

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the float32 RoPE tables, e.g. after loading onto the meta device or casting."""
        cos, sin = rope_cache(self.config.block_size, self.config.head_size, self.config.rope_base)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) / .half() would round the RoPE tables; keep them float32.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self.init_rope(self.rope_cos.device)
        return self

    def new_cache(
        self,
        batch_size: int,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """Allocate an empty KV cache for ``batch_size`` rows of up to ``max_length`` positions."""
        cfg = self.config
        max_length = max_length or cfg.block_size
        if max_length > cfg.block_size:
            raise ValueError(f"max_length {max_length} exceeds the context of {cfg.block_size} positions")
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        shape = (batch_size, cfg.n_query_groups, max_length, cfg.head_size)
        return KVCache(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
        )

    def forward_hidden(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_len: int | KVSegments | None = None,
    ) -> torch.Tensor:
        """Run the blocks and the final norm over input vectors x (B, T, C).

        ``positions`` is (T,) shared by all rows or (B, T) per row; with a cache, keys and
        values are written there and each query attends to cached positions <= its own.
        ``kv_len`` (the number of cache positions to read) defaults to max(positions) + 1; a list of
        (rows, length) segments makes each group of rows read its own length, so that a row's result
        is the same as in a batch of its group alone (rows in no segment get no attention).
        """
        return run(self.forward_hidden_steps(x, positions, cache, kv_len))

    def forward_hidden_steps(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_len: int | KVSegments | None = None,
    ) -> Steps[torch.Tensor]:
        """:meth:`forward_hidden` one block at a time (see :mod:`miniomni.cooperative`)."""
        batch, length, _ = x.shape
        if positions is None:
            positions = torch.arange(length, device=x.device)
        if cache is not None and kv_len is None:
            kv_len = int(positions.max()) + 1
        segments = kv_len if isinstance(kv_len, list) else None
        if segments is not None:
            kv_len = max(read for _, read in segments)
        limit = self.config.block_size if cache is None else cache.max_length
        if (kv_len or length) > limit:
            raise ValueError(f"sequence of {kv_len or length} positions exceeds the context of {limit}")
        cos = self.rope_cos[positions].unsqueeze(-3)
        sin = self.rope_sin[positions].unsqueeze(-3)
        if positions.dim() == 1:
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        mask = None
        if cache is not None:
            key_pos = torch.arange(kv_len, device=x.device)
            mask = key_pos <= positions.unsqueeze(-1)  # (T, L) or (B, T, L)
            mask = mask.view(-1 if positions.dim() == 2 else 1, 1, length, kv_len)
            mask = mask.repeat(1, 1, self.config.q_per_kv, 1)
        elif positions.dim() == 2 or not torch.equal(positions, torch.arange(length, device=x.device)):
            pos = positions if positions.dim() == 2 else positions.unsqueeze(0)
            mask = (pos.unsqueeze(-1) >= pos.unsqueeze(-2)).unsqueeze(1)
        for index, block in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[index], cache.values[index])
            x = block(x, cos, sin, mask, positions, layer_cache, kv_len if segments is None else segments)
            yield
        return self.final_norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Plain language-model logits (B, T, vocab) for token ids (B, T)."""
        return self.lm_head(self.forward_hidden(self.embed(input_ids), positions, cache))


def linear_rows(linear: nn.Module, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Output features [start, end) of a linear layer, reading only those weight rows.

    A module with its own ``rows(x, start, end)`` (the int8 linear) computes them itself.
    """
    own = getattr(linear, "rows", None)
    if own is not None:
        return own(x, start, end)
    bias = None if linear.bias is None else linear.bias[start:end]
    return F.linear(x, linear.weight[start:end], bias)
