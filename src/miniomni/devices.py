"""Where the model runs and in which precision: device and dtype names, and autocast."""

from __future__ import annotations

import contextlib

import torch

from .errors import MiniOmniError

# The names users may give for a dtype (CLI, recipes, Python), and what they mean.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# What inference supports; training may also keep float16 weights (see train/from_lm.py).
INFERENCE_DTYPES = (torch.float32, torch.bfloat16)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable device is an error that says so."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise MiniOmniError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MiniOmniError("--device cuda was asked for but this PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not _mps_available():
        raise MiniOmniError("--device mps was asked for but MPS is not available here; use --device cpu")
    return device


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_dtype(dtype: str | torch.dtype | None = "float32",
                  allowed: tuple[torch.dtype, ...] = INFERENCE_DTYPES) -> torch.dtype:
    """A dtype or one of :data:`DTYPES`' names -> the torch dtype; ``None`` or ``auto`` is float32."""
    if dtype is None or dtype == "auto":
        return torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else DTYPES.get(str(dtype))
    if resolved not in allowed:
        names = " or ".join(name for name, value in DTYPES.items() if value in allowed and len(name) > 4)
        raise MiniOmniError(f"dtype {dtype!r} is not supported here; use {names}")
    return resolved


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bfloat16 autocast where the weights are bfloat16 (CPU and CUDA); nothing otherwise."""
    if dtype == torch.bfloat16 and device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
