"""int8 weights times int8 activations on the CPU (fbgemm), each row of the batch scaled on its own.

The weight-only int8 kernel (``aten._weight_int8pack_mm``) streams the whole weight again
for every block of 4 rows, so a decode step for 8 or 16 rows costs 2 to 4 times one for 2.
fbgemm's int8 GEMM reads the weight once for any number of rows, but it quantizes its input
with one scale for the whole batch, which would make one talker's answer depend on the
others'. So each row is quantized here with its own symmetric scale (``x / s_r``, given to
fbgemm with scale 1 and a zero point in the middle of its unsigned range) and its output
multiplied by ``s_r`` again: a row's result never depends on the other rows (tested for
every batch size from 1 to 16).

Without 8-bit dot-product instructions (VNNI), fbgemm adds pairs of 8-bit products in
16 bits, which saturate for large activations; there the activations use 7 bits.

A weight converted with calibration (:mod:`miniomni.smoothing`) carries its outlier input
channels: those few channels are multiplied in float beside the int8 product, so they no
longer set each row's scale. The cost in quality, with and without that, is measured on a
real language model by ``benchmarks/int8_quality.py`` (``docs/performance.md``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

# Products of more rows than this are prompts (a decode step has two rows per answer): their outlier
# channels are added in one GEMM, whose sums may depend on the number of rows; a decode step's never do.
PROMPT_ROWS = 64
_OPS = getattr(torch.ops, "quantized", None)
_MATMUL = getattr(_OPS, "linear_with_input_q_dq_qweight_dq_output_fp32", None) if _OPS is not None else None


def available() -> bool:
    """Whether this PyTorch has fbgemm's int8 GEMM (x86 builds)."""
    return _MATMUL is not None and "fbgemm" in torch.backends.quantized.supported_engines


class Int8ActLinear:
    """One prepacked int8 weight (a linear, or several sharing an input) with per-row int8 activations.

    Not a module: it holds a packed copy of weights that an :class:`~miniomni.quantize.Int8Linear`
    (or several) already own, and adds nothing to a state dict.
    """

    def __init__(self, linears: list[nn.Module], bits: int, max_rows: int | None = None) -> None:
        if bits not in (7, 8):
            raise ValueError("activations are quantized to 7 or 8 bits")
        weight = torch.cat([m.weight for m in linears])
        scales = torch.cat([m.scales for m in linears]).double()
        outliers = getattr(linears[0], "outliers", None)
        self.outliers = outliers if outliers is not None and outliers.numel() else None
        if self.outliers is not None:
            # Those channels are multiplied in float by the dequantized weight columns; the int8 product
            # sees zeros there, so they neither set a row's scale nor add twice.
            self.side = (weight[:, self.outliers].float() * scales[:, None].float()).T.contiguous()
            self.keep = torch.ones(weight.shape[1])
            self.keep[self.outliers] = 0.0
            weight = weight.clone()
            weight[:, self.outliers] = 0
        biases = [m.bias for m in linears]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(m.out_features) if b is None else b.detach().float() for m, b in zip(linears, biases,
                                                                                           strict=True)])
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's prepack still takes one
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            quantized = torch._make_per_channel_quantized_tensor(
                weight.cpu(), scales.cpu(), torch.zeros(len(scales), dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.splits = [m.out_features for m in linears]
        self.max_rows = max_rows  # more rows (a prompt) go to the weight-only kernels; None: all
        self.limit = float(2 ** (bits - 1) - 1)  # |x / s_r| <= limit
        self.zero_point = 2 ** (bits - 1)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether this product runs on ``x`` (not more rows than ``max_rows``)."""
        return self.max_rows is None or x.numel() // x.shape[-1] <= self.max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., sum of outputs), in x's dtype."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).float()
        magnitude = flat.abs() if self.outliers is None else flat.abs().mul_(self.keep)
        scale = magnitude.amax(dim=1, keepdim=True).clamp_(min=1e-30) / self.limit
        out = _MATMUL(flat / scale, 1.0, self.zero_point, self.packed).mul_(scale)
        if self.outliers is not None and len(flat) > PROMPT_ROWS:  # a prompt: one GEMM for all its rows
            out.addmm_(flat[:, self.outliers], self.side)
        elif self.outliers is not None:  # one product per row (batched): a row's sum never depends on the batch
            side = flat[:, self.outliers].unsqueeze(1)
            out.unsqueeze(1).baddbmm_(side, self.side.expand(side.shape[0], *self.side.shape))
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype).reshape(*shape[:-1], out.shape[-1])


KINDS = ("qkv", "out", "gate_up", "down")  # the products of a block


def use_int8_activations(model: nn.Module, bits: int, kinds: tuple[str, ...] = KINDS,
                         max_rows: int | None = None) -> int:
    """Give the int8 linears of every block of ``model`` (an LLM) the int8-activation path; how many were packed.

    Attention's q/k/v product and output projection each become one call, the MLP's gate and
    up projections one call together, and its down projection one: four calls a block.
    ``kinds`` limits it to some of them (the rest stay weight-only); the heads always stay
    weight-only (they read only the rows they need). ``max_rows`` leaves products of more rows
    (a prompt's prefill) to the weight-only path, where a bfloat16 GEMM is the faster one.
    """
    from .quantize import Int8Linear

    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown products {sorted(unknown)}; choose from {KINDS}")
    packed = 0
    for block in model.layers:
        mlp = block.mlp
        for owner, name in _single_products(block):
            linear = getattr(owner, name)
            if name in kinds and isinstance(linear, Int8Linear):
                linear.int8_activations = Int8ActLinear([linear], bits, max_rows)
                packed += 1
        if "gate_up" in kinds and isinstance(mlp.gate, Int8Linear) and isinstance(mlp.up, Int8Linear):
            mlp.gate_up = Int8ActLinear([mlp.gate, mlp.up], bits, max_rows)
            packed += 1
    return packed


def _single_products(block: nn.Module) -> tuple[tuple[nn.Module, str], ...]:
    """The linears of a block that are one product each, as (owner, attribute); gate and up are fused."""
    return (block.attn, "qkv"), (block.attn, "out"), (block.mlp, "down")


def products(model: nn.Module) -> list[Int8ActLinear]:
    """Every int8-activation product of ``model``'s blocks (an LLM)."""
    found = []
    for block in model.layers:
        for owner, name in _single_products(block):
            product = getattr(getattr(owner, name), "int8_activations", None)
            if product is not None:
                found.append(product)
        if getattr(block.mlp, "gate_up", None) is not None:
            found.append(block.mlp.gate_up)
    return found


def swiglu_gate_up(gate_up: Int8ActLinear, x: torch.Tensor) -> torch.Tensor:
    """silu(gate(x)) * up(x) from the fused product."""
    gate, up = gate_up(x).split(gate_up.splits, dim=-1)
    return F.silu(gate) * up
