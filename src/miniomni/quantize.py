"""Weight-only int8 quantization as a drop-in swap of ``nn.Linear`` modules.

Weights are stored as int8 with one bfloat16 scale per output row (symmetric,
round to nearest). On CPU a decode step's product runs in ``aten._weight_int8pack_mm``,
whose inputs are bfloat16 (float32 activations are rounded to bfloat16 for it and its
output cast back); prompts and other devices multiply by the weight dequantized on the fly
into the activations' dtype. Changes outputs slightly: opt-in only (``--quantize int8``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MiniOmniError

# What ``--quantize`` accepts; "none" keeps the checkpoint's float weights.
QUANTIZE_MODES = ("none", "int8")

_INT8_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
# The int8 kernel is a matrix-vector path: fast for decode steps, slower than a bf16 GEMM on a
# dequantized weight for prompts (measured: 789 ms vs 368 ms for a 154-position prefill).
MAX_DECODE_ROWS = 16


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * row scale).T + bias.

    ``int8_activations`` (set by :func:`miniomni.int8act.use_int8_activations`) runs the
    product on int8 activations instead; None keeps the weight-only kernels.
    """

    int8_activations = None
    # Input channels whose activations stay in float on the int8-activation path (see miniomni.smoothing);
    # stored in a state dict as "<name>.outliers" beside the weight, read by :func:`attach_outliers`.
    outliers: torch.Tensor | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        quantized, scales = quantize_weight(linear.weight.detach())
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=quantized.device)
        module.weight.copy_(quantized)
        module.scales.copy_(scales)
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().clone()
        return module

    def rows(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Only output features [start, end): x @ W[start:end].T (no copy of W)."""
        return int8_linear(x, self.weight[start:end], self.scales[start:end],
                           None if self.bias is None else self.bias[start:end])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_activations is not None and self.int8_activations.takes(x):
            return self.int8_activations(x)
        return int8_linear(x, self.weight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"

    def _apply(self, fn, recurse=True):
        # .to(float32) casts floating buffers; the kernel takes bfloat16 scales whatever the activations.
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.bfloat16:
            self.scales = self.scales.to(torch.bfloat16)
        return self


def parse_quantize(mode: str | None) -> str | None:
    """A ``--quantize`` value -> ``"int8"``, or None for float weights (None or "none")."""
    if mode is None or mode == "none":
        return None
    if mode not in QUANTIZE_MODES:
        raise MiniOmniError(f"quantize={mode!r} is not supported; use {' or '.join(QUANTIZE_MODES)}")
    return mode


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 weight and bfloat16 per-row scales (symmetric, round to nearest)."""
    quantized = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], 8192):  # in row blocks: the 181k-row head needs no 650 MB temporaries
        block = weight[start : start + 8192].float()
        block_scales = (block.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        quantized[start : start + 8192] = (block / block_scales[:, None]).round_().clamp_(-128, 127)
        scales[start : start + 8192] = block_scales
    return quantized, scales.to(torch.bfloat16)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if _INT8_MM is not None and x.device.type == "cpu" and flat.shape[0] <= MAX_DECODE_ROWS:
        out = _INT8_MM(flat.to(torch.bfloat16), weight, scales)
    else:
        dtype = flat.dtype if flat.dtype in (torch.float32, torch.bfloat16) else scales.dtype
        out = F.linear(flat.to(dtype), weight.to(dtype) * scales[:, None].to(dtype))
    out = out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])
    return out if bias is None else out + bias.to(out.dtype)


def quantize_int8(module: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` below ``module`` (names in ``skip`` excepted) in place."""
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            quantize_int8(child, skip)
    return module



OUTLIERS_SUFFIX = ".outliers"


def attach_outliers(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give each Int8Linear of ``model`` its ``<name>.outliers`` entry of ``state``; the state without them."""
    modules = dict(model.named_modules())
    rest = {}
    for key, tensor in state.items():
        owner = modules.get(key[: -len(OUTLIERS_SUFFIX)]) if key.endswith(OUTLIERS_SUFFIX) else None
        if isinstance(owner, Int8Linear):
            owner.outliers = tensor.to(torch.long)
        else:
            rest[key] = tensor
    return rest
