"""Smoothing before int8 activations: move each input channel's outliers from the activations into the weights.

Quantizing a row of activations to 8 bits with one scale loses the small channels when a few
channels are much larger than the rest, and in a trained transformer the same few channels
are large for every token. For a product ``x @ W.T`` and any positive per-channel scales
``s``, ``(x / s) @ (W * s).T`` is the same product: dividing channel ``j`` of the activations
by ``s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)`` (SmoothQuant) evens out the channels
the activation quantizer sees and hands the difference to the weights, which are quantized
per output row and take it well.

No work is added at run time: ``1 / s`` is folded into what produces each product's input.

* q/k/v and gate/up read an RMSNorm's output: its weight is divided by ``s``.
* down reads ``silu(gate) * up``: up's rows (and bias) are divided by ``s``.
* The attention output reads the heads' mixes of values: the value rows are divided by ``s``.
  With grouped queries, all heads of a group share one value row per channel, so those heads
  share one scale (the largest of their maxima).

The model computes the same function in real arithmetic; only the rounding differs
(tested). The maxima come from running the float model over calibration text, one block at a
time (:func:`smoothed_blocks`), so a converter never needs every float weight at once.

Smoothing evens the channels out only part of the way. The few input channels of each
product that stay largest after it (32 by default, chosen on the calibration text) are also
recorded with the int8 weights: the int8-activation path multiplies them in float beside the
int8 product (:mod:`miniomni.int8act`), so they no longer set each row's scale.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .config import OmniConfig

__all__ = ["DEFAULT_ALPHA", "DEFAULT_OUTLIERS", "KINDS", "block_maxima", "calibrate_block", "smooth_block",
           "smooth_llm", "smoothed_blocks"]

DEFAULT_ALPHA = 0.5
DEFAULT_OUTLIERS = 32  # input channels of each product kept in float on the int8-activation path
KINDS = ("qkv", "out", "gate_up", "down")  # the four products of a block, named as in int8act


def _inputs(block: nn.Module) -> dict[str, nn.Module]:
    return {"qkv": block.attn.qkv, "out": block.attn.out, "gate_up": block.mlp.gate, "down": block.mlp.down}


@torch.no_grad()
def block_maxima(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[
        torch.Tensor, dict[str, torch.Tensor]]:
    """Run one block causally on ``x`` (B, T, C) with RoPE tables (positions, head size).

    Returns its output and, for each product, the largest magnitude its input took in each channel.
    """
    maxima: dict[str, torch.Tensor] = {}
    hooks = []
    for kind, linear in _inputs(block).items():
        def record(_module, args, kind=kind):
            seen = args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).amax(dim=0)
            maxima[kind] = seen if kind not in maxima else torch.maximum(maxima[kind], seen)
        hooks.append(linear.register_forward_pre_hook(record))
    try:
        length = x.shape[1]
        positions = torch.arange(length)
        out = block(x, cos[None, None, :length], sin[None, None, :length], None, positions, None, length)
    finally:
        for hook in hooks:
            hook.remove()
    return out, maxima


def _scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    weight_max = torch.stack([w.detach().abs().float().amax(dim=0) for w in weights]).amax(dim=0)
    scales = act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    return scales.clamp(min=1e-5)


@torch.no_grad()
def smooth_block(block: nn.Module, maxima: dict[str, torch.Tensor], config: OmniConfig,
                 alpha: float = DEFAULT_ALPHA, kinds: tuple[str, ...] = KINDS) -> dict[str, torch.Tensor]:
    """Fold smoothing scales into one float block in place (it computes the same function); the scales by product."""
    attn, mlp = block.attn, block.mlp
    used: dict[str, torch.Tensor] = {}
    if "qkv" in kinds:
        s = _scales(maxima["qkv"], [attn.qkv.weight], alpha)
        block.attn_norm.weight.div_(s.to(block.attn_norm.weight.dtype))
        attn.qkv.weight.mul_(s.to(attn.qkv.weight.dtype))
        used["qkv"] = s
    if "gate_up" in kinds:
        s = _scales(maxima["gate_up"], [mlp.gate.weight, mlp.up.weight], alpha)
        block.mlp_norm.weight.div_(s.to(block.mlp_norm.weight.dtype))
        mlp.gate.weight.mul_(s.to(mlp.gate.weight.dtype))
        mlp.up.weight.mul_(s.to(mlp.up.weight.dtype))
        used["gate_up"] = s
    if "down" in kinds:
        s = _scales(maxima["down"], [mlp.down.weight], alpha)
        mlp.up.weight.div_(s.to(mlp.up.weight.dtype)[:, None])
        if mlp.up.bias is not None:
            mlp.up.bias.div_(s.to(mlp.up.bias.dtype))
        mlp.down.weight.mul_(s.to(mlp.down.weight.dtype))
        used["down"] = s
    if "out" in kinds:
        hs, n_kv, per = config.head_size, config.n_query_groups, config.q_per_kv
        s = _scales(maxima["out"], [attn.out.weight], alpha)
        group = s.view(n_kv, per, hs).amax(dim=1)  # one scale per value channel of each group
        s = group.repeat_interleave(per, dim=0).reshape(-1)
        values = slice(config.n_head * hs + n_kv * hs, None)
        attn.qkv.weight[values].div_(group.reshape(-1, 1).to(attn.qkv.weight.dtype))
        if attn.qkv.bias is not None:
            attn.qkv.bias[values].div_(group.reshape(-1).to(attn.qkv.bias.dtype))
        attn.out.weight.mul_(s.to(attn.out.weight.dtype))
        used["out"] = s
    return used


@torch.no_grad()
def calibrate_block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, config: OmniConfig,
                    alpha: float | None = DEFAULT_ALPHA, outliers: int = DEFAULT_OUTLIERS) -> tuple[
                        torch.Tensor, dict[str, torch.Tensor]]:
    """Measure one float block on ``x`` and smooth it in place: its output (the next block's input), and for each
    product the ``outliers`` input channels that remain largest after smoothing (``alpha=None``: no smoothing)."""
    out, maxima = block_maxima(block, x, cos, sin)
    if alpha is None:  # outlier channels only, no smoothing
        scales = {kind: torch.ones_like(found) for kind, found in maxima.items()}
    else:
        scales = smooth_block(block, maxima, config, alpha)
    chosen = {kind: (maxima[kind] / scales[kind]).topk(min(outliers, len(scales[kind]))).indices.sort().values
              for kind in KINDS} if outliers else {}
    return out, chosen


# Where each product's outlier channels are stored: the Int8Linear(s) that read that input.
_OUTLIER_OWNERS = {"qkv": ("attn.qkv",), "out": ("attn.out",), "gate_up": ("mlp.gate", "mlp.up"),
                   "down": ("mlp.down",)}


@torch.no_grad()
def smooth_llm(llm: nn.Module, ids: torch.Tensor, alpha: float | None = DEFAULT_ALPHA,
               outliers: int = 0) -> dict[str, torch.Tensor]:
    """Smooth every block of a float :class:`~miniomni.models.llm.Transformer` in place, calibrated on token ids
    (B, T); the ``<linear>.outliers`` entries for :func:`miniomni.quantize.attach_outliers` (none by default)."""
    x = llm.embed(ids).float()
    found: dict[str, torch.Tensor] = {}
    for index, block in enumerate(llm.layers):
        x, chosen = calibrate_block(block, x.to(block.attn_norm.weight.dtype), llm.rope_cos, llm.rope_sin,
                                    llm.config, alpha, outliers)
        x = x.float()
        for kind, channels in chosen.items():
            for owner in _OUTLIER_OWNERS[kind]:
                found[f"layers.{index}.{owner}.outliers"] = channels.clone()
    return found


def smoothed_blocks(state: dict[str, torch.Tensor], config: OmniConfig, ids: torch.Tensor,
                    alpha: float = DEFAULT_ALPHA, outliers: int = DEFAULT_OUTLIERS,
                    prefix: str = "llm.") -> Iterator[tuple[str, torch.Tensor]]:
    """Smooth a float model's blocks from its state dict, one block at a time: each block's new float tensors and
    its ``.outliers`` entries, as (key, tensor). Only one block's float32 weights are held at once."""
    from .models.llm import Block, rope_cache

    cos, sin = rope_cache(ids.shape[-1], config.head_size, config.rope_base)
    x = torch.nn.functional.embedding(ids, state[f"{prefix}embed.weight"].float())
    for index in range(config.n_layer):
        head = f"{prefix}layers.{index}."
        with torch.device("meta"):
            block = Block(config)
        block.load_state_dict({k: state[head + k].to(torch.float32, copy=True) for k in block.state_dict()},
                              assign=True)
        x, chosen = calibrate_block(block, x, cos, sin, config, alpha, outliers)
        for key, tensor in block.state_dict().items():
            yield head + key, tensor
        for kind, channels in chosen.items():
            for owner in _OUTLIER_OWNERS[kind]:
                yield f"{head}{owner}.outliers", channels.clone()  # a file stores no tensor twice
