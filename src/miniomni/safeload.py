"""``torch.load`` restricted to tensors (``weights_only=True``), with errors a user can act on."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def _half_written(what: str, path: Path, detail: str, fix: str) -> CheckpointError:
    return CheckpointError(
        f"{what} '{path}' is incomplete or corrupt ({detail}); it is probably a half-written download. "
        f"Delete it and {fix}."
    )


def load_torch_file(path: str | os.PathLike, what: str,
                    fix: str = "download again with `miniomni download DIR`") -> Any:
    """Load a ``torch.save`` file holding only tensors and plain containers.

    ``what`` names the file for the user ("Whisper checkpoint"); ``fix`` says how to get a good copy.
    Pickled Python objects are refused: unpickling a downloaded file can run arbitrary code.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} '{path}' not found; {fix}.")
    if path.is_dir():
        raise CheckpointError(f"{what} '{path}' is a directory; pass the path of the file itself.")
    size = path.stat().st_size
    if size == 0:
        raise _half_written(what, path, "the file is empty", fix)
    with open(path, "rb") as handle:
        head = handle.read(4)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and not head.startswith(b"\x80"):
        # torch.save writes zip archives; legacy files start with a pickle protocol byte.
        if head.startswith(b"PK"):
            raise _half_written(what, path, f"the zip archive ends early after {size} bytes", fix)
        raise _half_written(what, path, "it is not a PyTorch checkpoint archive", fix)
    try:
        # mmap keeps multi-GB state dicts out of RAM until used; legacy files cannot be mapped.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(
                f"{what} '{path}' holds pickled Python objects, not only tensors; it is refused for "
                f"safety (loading it could run arbitrary code). Use the published file: {fix}."
            ) from exc
        raise _half_written(what, path, f"unpickling failed: {exc}", fix) from exc
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise _half_written(what, path, f"{type(exc).__name__}: {detail}", fix) from exc


def mapped_ranges(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (Linux; empty elsewhere)."""
    target = str(Path(path).resolve())
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() == target:
                    low, high = fields[0].split("-")
                    ranges.append((int(low, 16), int(high, 16)))
    except OSError:
        pass
    return ranges


def release_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Let the kernel drop the resident pages of a tensor memory-mapped from a file (``ranges``).

    Used once a weight has been converted, so that loading a float32 checkpoint into bfloat16
    or int8 never holds the whole float32 file in memory. Pages read again come back from the
    file unchanged; tensors outside ``ranges`` are left alone.
    """
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(low <= start and end <= high for low, high in ranges):
        return
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
