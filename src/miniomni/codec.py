"""SNAC 24 kHz codec: (7, N) Mini-Omni audio layers <-> 24 kHz waveform (streaming: :mod:`miniomni.snacstream`)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from .audio import OUTPUT_SAMPLE_RATE
from .errors import CheckpointError
from .snacstream import Op, SNACStream, plan_stream
from .tokens import CODEBOOK_SIZE, NUM_AUDIO_LAYERS, SAMPLES_PER_FRAME, codes_to_layers, layers_to_codes


class Codec:
    """A loaded SNAC model. Decoding is seeded so that the codec's noise injection repeats."""

    def __init__(self, snac_model: torch.nn.Module, device: torch.device | str = "cpu",
                 stream_dtype: torch.dtype = torch.float32) -> None:
        self.model = _fuse_weight_norm(snac_model).eval().to(device)
        self.device = torch.device(device)
        self.sample_rate = int(getattr(snac_model, "sampling_rate", OUTPUT_SAMPLE_RATE))
        self.hop_length = int(getattr(snac_model, "hop_length", 512))
        self.noise = True
        self._noise_blocks: dict[tuple[int, str], torch.nn.Module] = {}
        self.stream_dtype = stream_dtype
        self._stream_plan: list[Op] | None = None

    @classmethod
    def from_state_dict(
        cls, config: dict[str, Any], state_dict: dict[str, torch.Tensor], device: torch.device | str = "cpu",
        stream_dtype: torch.dtype = torch.float32,
    ) -> Codec:
        """Build SNAC from its ``config.json`` contents and weights."""
        from snac import SNAC

        try:
            model = SNAC(**config)
            model.load_state_dict(state_dict, strict=True)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"the SNAC codec config and weights do not fit ({str(exc).splitlines()[0]}); delete the snac/ "
                "folder and download it again with `miniomni download DIR`"
            ) from exc
        return cls(model, device, stream_dtype)

    @property
    def samples_per_frame(self) -> int:
        return SAMPLES_PER_FRAME

    def set_noise(self, enabled: bool) -> None:
        """Turn SNAC's decoder noise injection on (published behaviour) or off (exactly repeatable windows)."""
        self.noise = enabled
        for parent in self.model.modules():
            for name, child in list(parent.named_children()):
                if type(child).__name__ == "NoiseBlock" and not enabled:
                    self._noise_blocks[(id(parent), name)] = child
                    setattr(parent, name, torch.nn.Identity())
                elif isinstance(child, torch.nn.Identity) and enabled and (id(parent), name) in self._noise_blocks:
                    setattr(parent, name, self._noise_blocks.pop((id(parent), name)))

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
        devices = [self.device] if self.device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=devices) if seed is not None else contextlib.nullcontext()
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


    def set_stream_dtype(self, dtype: torch.dtype) -> None:
        """Stream in ``dtype`` from the next stream on (streams already open keep theirs)."""
        if dtype != self.stream_dtype:
            self.stream_dtype = dtype
            self._stream_plan = None

    def stream_ms_per_frame(self, frames: int = 2) -> float:
        """What streaming costs here, per frame, in ``stream_dtype``: one timed call after a warm-up call."""
        import time

        codes = [[(97 * i + 13 * layer) % CODEBOOK_SIZE for layer in range(NUM_AUDIO_LAYERS)] for i in range(frames)]
        stream = SNACStream(self, seed=0)
        stream.push(codes[:1])
        start = time.perf_counter()
        stream.push(codes)
        return 1000 * (time.perf_counter() - start) / frames

    def stream_plan(self) -> list[Op]:
        """The decoder as a list of streaming operations (built once, in ``stream_dtype``)."""
        if self._stream_plan is None:
            noise = self.noise
            self.set_noise(True)  # plan the noise injections too; each stream decides whether to add noise
            decoder = self.model.decoder.model
            if self.stream_dtype != torch.float32:
                import copy

                decoder = copy.deepcopy(decoder).to(self.stream_dtype)
            self._stream_plan = plan_stream(decoder)
            self.set_noise(noise)
        return self._stream_plan


def _fuse_weight_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Compute SNAC's weight-normalised weights once instead of at every call (same values)."""
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model
