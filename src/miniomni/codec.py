"""SNAC 24 kHz codec: (7, N) Mini-Omni audio layers <-> 24 kHz waveform."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from .tokens import CODEBOOK_SIZE, SAMPLES_PER_FRAME, codes_to_layers, layers_to_codes

SNAC_SAMPLE_RATE = 24000


class Codec:
    """A loaded SNAC model. Decoding is seeded so that the codec's noise injection repeats."""

    def __init__(self, snac_model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        self.model = snac_model.eval().to(device)
        self.device = torch.device(device)
        self.sample_rate = int(getattr(snac_model, "sampling_rate", SNAC_SAMPLE_RATE))
        self.hop_length = int(getattr(snac_model, "hop_length", 512))

    @classmethod
    def from_state_dict(
        cls, config: dict[str, Any], state_dict: dict[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> Codec:
        """Build SNAC from its ``config.json`` contents and weights."""
        from snac import SNAC

        model = SNAC(**config)
        model.load_state_dict(state_dict, strict=True)
        return cls(model, device)

    @property
    def samples_per_frame(self) -> int:
        return SAMPLES_PER_FRAME

    @torch.inference_mode()
    def decode(self, layers: torch.Tensor, seed: int | None = 0) -> np.ndarray:
        """(7, N) layer codes -> float32 waveform of N * 2048 samples at 24 kHz.

        ``seed`` fixes the decoder's noise (None leaves the global RNG as it is).
        """
        if layers.numel() == 0:
            return np.zeros(0, dtype=np.float32)
        if int(layers.min()) < 0 or int(layers.max()) >= CODEBOOK_SIZE:
            raise ValueError("audio layers hold ids outside the SNAC codebook (0..4095)")
        codes = [c.to(self.device) for c in layers_to_codes(layers.long())]
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            audio = self.model.decode(codes)
        return audio.reshape(-1).float().cpu().numpy()

    @torch.inference_mode()
    def encode(self, waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
        """24 kHz mono waveform -> (7, N) layer codes (the waveform is padded to whole frames)."""
        audio = torch.as_tensor(np.asarray(waveform, dtype=np.float32)).reshape(1, 1, -1).to(self.device)
        remainder = audio.shape[-1] % SAMPLES_PER_FRAME
        if remainder:
            audio = torch.nn.functional.pad(audio, (0, SAMPLES_PER_FRAME - remainder))
        codes = self.model.encode(audio)
        return codes_to_layers([c.cpu() for c in codes])
