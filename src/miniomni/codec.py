"""SNAC 24 kHz codec: (7, N) Mini-Omni audio layers <-> 24 kHz waveform."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from .audio import OUTPUT_SAMPLE_RATE
from .errors import CheckpointError
from .tokens import CODEBOOK_SIZE, NUM_AUDIO_LAYERS, SAMPLES_PER_FRAME, codes_to_layers, layers_to_codes


class Codec:
    """A loaded SNAC model. Decoding is seeded so that the codec's noise injection repeats."""

    def __init__(self, snac_model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        self.model = snac_model.eval().to(device)
        self.device = torch.device(device)
        self.sample_rate = int(getattr(snac_model, "sampling_rate", OUTPUT_SAMPLE_RATE))
        self.hop_length = int(getattr(snac_model, "hop_length", 512))
        self._noise_blocks: dict[tuple[int, str], torch.nn.Module] = {}

    @classmethod
    def from_state_dict(
        cls, config: dict[str, Any], state_dict: dict[str, torch.Tensor], device: torch.device | str = "cpu"
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
        return cls(model, device)

    @property
    def samples_per_frame(self) -> int:
        return SAMPLES_PER_FRAME

    def set_noise(self, enabled: bool) -> None:
        """Turn SNAC's decoder noise injection on (published behaviour) or off (exactly repeatable windows)."""
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


class StreamingDecoder:
    """Frames in as they are generated, audio out as soon as it can be final.

    Each chunk is decoded with ``left_context`` frames before it and ``lookahead`` frames
    after it (the codec's convolutions see both sides), and only the chunk's own samples
    are kept, so the concatenated stream matches the offline decode of the whole answer
    (SNR measured in the tests and benchmarks) and no frame is dropped at the end. The
    first chunk leaves as soon as ``first_chunk`` frames exist, without lookahead; chunk
    sizes then double up to ``max_chunk`` frames to spread the codec's fixed cost.
    """

    def __init__(
        self,
        codec: Codec,
        left_context: int = 2,
        lookahead: int = 1,
        first_chunk: int = 1,
        max_chunk: int = 16,
        seed: int | None = 0,
    ) -> None:
        if first_chunk < 1 or max_chunk < first_chunk or left_context < 0 or lookahead < 0:
            raise ValueError("need 1 <= first_chunk <= max_chunk and non-negative context and lookahead")
        self.codec = codec
        self.left_context = left_context
        self.lookahead = lookahead
        self.first_chunk = first_chunk
        self.max_chunk = max_chunk
        self.seed = seed
        self.frames: list[list[int]] = []
        self.emitted = 0  # frames whose samples have left
        self._next_chunk = first_chunk

    def push(self, frame: list[int]) -> None:
        """Add one complete frame (7 codes, depth-first order)."""
        if len(frame) != NUM_AUDIO_LAYERS:
            raise ValueError(f"a frame has {NUM_AUDIO_LAYERS} codes, got {len(frame)}")
        self.frames.append([int(c) for c in frame])

    def pull(self, final: bool = False) -> np.ndarray | None:
        """The next chunk of 24 kHz float32 samples if one is ready (everything left when ``final``)."""
        available = len(self.frames)
        if final:
            end = available
        else:
            end = available if self.emitted == 0 else available - self.lookahead
            if end - self.emitted < self._next_chunk:
                return None
            end = self.emitted + self._next_chunk if self.emitted else end
        if end <= self.emitted:
            return None
        start = max(0, self.emitted - self.left_context)
        stop = available if final else min(available, end + self.lookahead)
        window = torch.tensor(self.frames[start:stop], dtype=torch.long).T
        audio = self.codec.decode(window, seed=self.seed)
        chunk = audio[(self.emitted - start) * SAMPLES_PER_FRAME : (end - start) * SAMPLES_PER_FRAME]
        self.emitted = end
        self._next_chunk = min(self.max_chunk, self._next_chunk * 2)
        return chunk
