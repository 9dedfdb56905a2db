"""Whisper features of the training audio: :class:`FeatureCache` computes them on the fly and keeps
them on disk, keyed by a hash of the audio; :class:`CachedFeatures` stands in for one entry.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MiniOmniError


@dataclass(frozen=True)
class CachedFeatures:
    """Whisper features (F, D) kept on disk by a :class:`FeatureCache`, read only when a batch is built.

    Stands in for the tensor in a ``TrainingExample`` (``shape``, ``dim()``, ``load()``), so a
    large dataset's features never sit in memory all at once.
    """

    path: Path
    shape: tuple[int, int]

    def dim(self) -> int:
        """2, like the (F, D) tensor it stands for."""
        return 2

    def load(self) -> torch.Tensor:
        """The features as a float32 tensor."""
        try:
            data = np.load(self.path)
        except (OSError, ValueError, EOFError) as exc:
            raise MiniOmniError(f"cached Whisper features {self.path} cannot be read ({exc}); delete that file "
                                "and start again: it is computed anew") from exc
        if tuple(data.shape) != self.shape:
            raise MiniOmniError(f"cached Whisper features {self.path} have shape {tuple(data.shape)}, expected "
                                f"{self.shape}; the cache changed under a running job: delete the file and start again")
        return torch.from_numpy(data.astype(np.float32))


class FeatureCache:
    """Whisper features (F, D) of a 16 kHz waveform, computed by ``encode`` and cached on disk as float16 .npy.

    The key is a SHA-256 of the float32 samples and ``namespace`` (name the encoder there, so
    features of different checkpoints do not mix). Without ``directory`` nothing is stored.
    ``encode`` is e.g. ``MiniOmni.encode_audio`` (returns (1, F, D)) or any waveform -> (F, D).
    With ``lazy`` (and a directory) a call returns :class:`CachedFeatures` instead of the tensor.
    """

    def __init__(self, encode: Callable[[np.ndarray], torch.Tensor], directory: str | Path | None = None,
                 namespace: str = "", lazy: bool = False) -> None:
        self.encode = encode
        self.directory = None if directory is None else Path(directory)
        self.namespace = namespace
        self.lazy = lazy and self.directory is not None
        self.hits = 0
        self.misses = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def key(self, audio: np.ndarray) -> str:
        """The cache entry's name: SHA-256 of the namespace and the float32 samples."""
        digest = hashlib.sha256(self.namespace.encode())
        digest.update(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
        return digest.hexdigest()

    def __call__(self, audio: np.ndarray) -> torch.Tensor | CachedFeatures:
        path = None if self.directory is None else self.directory / f"{self.key(audio)}.npy"
        if path is not None and path.exists():
            try:
                if self.lazy:  # reads the header only
                    cached = CachedFeatures(path, tuple(np.load(path, mmap_mode="r").shape))
                else:
                    cached = torch.from_numpy(np.load(path).astype(np.float32))
                self.hits += 1
                return cached
            except (OSError, ValueError, EOFError):
                path.unlink(missing_ok=True)  # a damaged entry (e.g. a disk filled up): compute it again
        self.misses += 1
        features = self.encode(audio)
        if features.dim() == 3:
            features = features[0]
        features = features.detach().float().cpu()
        if path is not None:
            # Ranks (on one machine or several sharing the folder) may write the same entry at once.
            partial = path.with_name(f"{path.stem}.{socket.gethostname()}.{os.getpid()}.tmp.npy")
            np.save(partial, features.numpy().astype(np.float16))
            partial.replace(path)
            if self.lazy:
                return CachedFeatures(path, tuple(features.shape))
            # Return what a later hit returns, so cached and fresh runs see the same numbers.
            features = features.half().float()
        return features
