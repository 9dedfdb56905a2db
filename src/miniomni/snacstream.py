"""SNAC's decoder as a stream: frames in as they are sampled, final audio out.

SNAC's decoder is convolutional and non-causal: a sample depends on about 2.6 frames of
codes after it. Streamed, each convolution keeps the input it still needs from the last
call, so every frame goes through the decoder once, and each operation gives out only
samples that will not change. A convolution's first outputs (the ones that would see
input before the start) are dropped, and at the end each one pads with the zeros that
the offline decode pads with, so the stream equals the offline decode of the whole answer
(up to floating-point rounding, and to the noise, which is drawn per stream).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .tokens import CODEBOOK_SIZE, NUM_AUDIO_LAYERS, SAMPLES_PER_FRAME, layers_to_codes


class StreamableCodec(Protocol):
    """What a stream needs of its codec (``codec.Codec`` is one): the SNAC model and how to run it."""

    model: torch.nn.Module
    device: torch.device
    stream_dtype: torch.dtype
    noise: bool

    def stream_plan(self) -> list[Op]: ...


class Op:
    """One step of the decoder on a stream; ``state`` is this operation's slot in the stream's state."""

    def run(self, x: torch.Tensor, state: dict, final: bool, noise: _Noise) -> torch.Tensor:
        raise NotImplementedError


class _Pointwise(Op):
    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def run(self, x: torch.Tensor, state: dict, final: bool, noise: _Noise) -> torch.Tensor:
        return self.module(x) if x.shape[-1] else x


class _Conv(Op):
    """A "same"-padded Conv1d: keeps the last (kernel - 1) * dilation inputs between calls."""

    def __init__(self, conv: torch.nn.Conv1d) -> None:
        self.conv = conv
        (kernel,), (dilation,), (padding,) = conv.kernel_size, conv.dilation, conv.padding
        if conv.stride != (1,) or 2 * padding != (kernel - 1) * dilation:
            raise ValueError("only stride-1 convolutions padded to keep their length can stream")
        self.history, self.padding = (kernel - 1) * dilation, padding

    def run(self, x: torch.Tensor, state: dict, final: bool, noise: _Noise) -> torch.Tensor:
        if self.history == 0:
            return self.conv(x) if x.shape[-1] else x
        if "past" not in state:  # the offline decode's left padding; its outputs are dropped below
            state["past"] = x.new_zeros(x.shape[0], x.shape[1], self.history)
            state["drop"] = self.padding
        if final:
            x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], self.padding)], -1)
        if not x.shape[-1]:
            return x
        full = torch.cat([state["past"], x], -1)
        state["past"] = full[..., -self.history:]
        y = torch.nn.functional.conv1d(full, self.conv.weight, self.conv.bias, dilation=self.conv.dilation,
                                       groups=self.conv.groups)
        drop = min(state["drop"], y.shape[-1])
        state["drop"] -= drop
        return y[..., drop:]


class _TransposedConv(Op):
    """ConvTranspose1d with kernel 2 * stride, as one matrix product and an overlap-add.

    Input step i writes output block i (its first ``stride`` taps) and block i + 1 (the
    other ``stride``), so a block is final once the next input is known; the product for
    the last input is kept for the next call. (PyTorch's own kernel takes a slow path on
    the short inputs of a stream.)
    """

    def __init__(self, conv: torch.nn.ConvTranspose1d) -> None:
        (kernel,), (stride,), (padding,), (extra,) = conv.kernel_size, conv.stride, conv.padding, conv.output_padding
        if kernel != 2 * stride or extra != 0 or conv.groups != 1:
            raise ValueError("only transposed convolutions with kernel = 2 * stride can stream")
        self.stride, self.padding = stride, padding
        self.out_channels = conv.out_channels
        # (in, out, 2s) -> (in, 2s * out): a row of taps per input channel, tap-major.
        self.weight = conv.weight.detach().permute(0, 2, 1).reshape(conv.in_channels, kernel * conv.out_channels)
        self.bias = None if conv.bias is None else conv.bias.detach().view(1, -1, 1)

    def run(self, x: torch.Tensor, state: dict, final: bool, noise: _Noise) -> torch.Tensor:
        s, batch = self.stride, x.shape[0]
        pieces = []
        if x.shape[-1]:
            rows = x.transpose(1, 2).reshape(batch * x.shape[-1], x.shape[1])
            taps = torch.mm(rows, self.weight).view(batch, x.shape[-1], 2, s, self.out_channels)
            first, second = taps[:, :, 0], taps[:, :, 1]  # (B, L, s, out): blocks i and i + 1
            carried = state.get("carry")
            if carried is None:  # the stream's start: nothing reaches block 0 from before it
                carried = torch.zeros_like(second[:, :1])
                state["drop"] = self.padding
            blocks = first + torch.cat([carried, second[:, :-1]], 1)
            state["carry"] = second[:, -1:]
            pieces.append(blocks.reshape(batch, -1, self.out_channels).transpose(1, 2))
        if final and "carry" in state:  # the last input alone reaches one more block; the offline crop ends there
            last = state.pop("carry").reshape(batch, s, self.out_channels).transpose(1, 2)
            pieces.append(last[..., : s - self.padding])
        if not pieces:
            return x.new_zeros(batch, self.out_channels, 0)
        y = torch.cat(pieces, -1)
        if self.bias is not None:
            y = y + self.bias
        drop = min(state.get("drop", 0), y.shape[-1])
        state["drop"] = state.get("drop", 0) - drop
        return y[..., drop:]


class _NoiseInjection(Op):
    def __init__(self, block: torch.nn.Module, index: int) -> None:
        self.linear = block.linear
        self.index = index

    def run(self, x: torch.Tensor, state: dict, final: bool, noise: _Noise) -> torch.Tensor:
        if not x.shape[-1] or not noise.enabled:
            return x
        return x + noise.draw(self.index, x) * self.linear(x)


class _Residual(Op):
    """x + branch(x): x waits in a queue until the branch's (delayed) outputs catch up with it."""

    def __init__(self, branch: list[Op]) -> None:
        self.branch = branch

    def run(self, x: torch.Tensor, state: dict, final: bool, noise: _Noise) -> torch.Tensor:
        slots = state.setdefault("branch", [{} for _ in self.branch])
        y = x
        for op, slot in zip(self.branch, slots, strict=True):
            y = op.run(y, slot, final, noise)
        waiting = torch.cat([state["skip"], x], -1) if "skip" in state else x
        state["skip"] = waiting[..., y.shape[-1]:]
        return waiting[..., : y.shape[-1]] + y


def plan_stream(module: torch.nn.Module, noise_count: list[int] | None = None) -> list[Op]:
    """The decoder's modules as streaming operations, in order."""
    noise_count = [0] if noise_count is None else noise_count
    name = type(module).__name__
    if isinstance(module, torch.nn.Sequential):
        ops: list[Op] = []
        for child in module:
            ops += plan_stream(child, noise_count)
        return ops
    if name in ("DecoderBlock",):
        return plan_stream(module.block, noise_count)
    if name == "ResidualUnit":
        return [_Residual(plan_stream(module.block, noise_count))]
    if name == "NoiseBlock":
        noise_count[0] += 1
        return [_NoiseInjection(module, noise_count[0] - 1)]
    if isinstance(module, torch.nn.ConvTranspose1d):
        return [_TransposedConv(module)]
    if isinstance(module, torch.nn.Conv1d):
        return [_Conv(module)]
    if name in ("Snake1d", "Tanh", "Identity"):
        return [_Pointwise(module)]
    raise ValueError(f"SNAC decoder part {name} cannot be streamed")


class _Noise:
    """The decoder's noise for one stream: its own generator, so streams do not disturb each other."""

    def __init__(self, seed: int | None, enabled: bool) -> None:
        self.enabled = enabled
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def draw(self, index: int, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn((x.shape[0], 1, x.shape[-1]), generator=self.generator)
        return noise.to(device=x.device, dtype=x.dtype)


class SNACStream:
    """One answer's audio, decoded as its frames arrive: each frame goes through SNAC once.

    :meth:`push` takes frames (7 codes each) and returns the samples that are now final;
    ``push([], final=True)`` returns the rest. Samples come out about 2.6 frames after the
    frames that decide them (the decoder looks that far ahead); :meth:`preview` decodes
    the frames so far as if the answer ended there, to play something before that.
    """

    def __init__(self, codec: StreamableCodec, seed: int | None = 0) -> None:
        self.codec = codec
        self.plan = codec.stream_plan()
        self.state: list[dict] = [{} for _ in self.plan]
        self.noise = _Noise(seed, codec.noise)
        self.frames = 0  # frames pushed
        self.samples = 0  # final samples given out
        self.lag = _lag(self.plan)  # samples: after n frames, n * 2048 - lag samples are final

    @torch.inference_mode()
    def push(self, frames: list[list[int]], final: bool = False) -> np.ndarray:
        """Decode new frames; the float32 samples that became final (all that is left when ``final``)."""
        audio = self._run(self.state, self.noise, frames, final)
        self.frames += len(frames)
        self.samples += len(audio)
        return audio

    @torch.inference_mode()
    def preview(self) -> np.ndarray:
        """Every sample of the frames pushed so far as if the answer ended after them (not final)."""
        import copy

        state = [_clone_state(slot) for slot in self.state]
        noise = copy.copy(self.noise)
        noise.generator = torch.Generator().set_state(self.noise.generator.get_state())
        return self._run(state, noise, [], True)

    def _run(self, state: list[dict], noise: _Noise, frames: list[list[int]], final: bool) -> np.ndarray:
        dtype = self.codec.stream_dtype
        if frames:
            layers = torch.tensor(frames, dtype=torch.long).T
            if int(layers.min()) < 0 or int(layers.max()) >= CODEBOOK_SIZE:
                raise ValueError("audio frames hold ids outside the SNAC codebook (0..4095)")
            codes = [c.to(self.codec.device) for c in layers_to_codes(layers)]
            x = self.codec.model.quantizer.from_codes(codes).to(dtype)
        else:
            channels = self.codec.model.quantizer.quantizers[0].out_proj.out_channels
            x = torch.zeros(1, channels, 0, device=self.codec.device, dtype=dtype)
        for op, slot in zip(self.plan, state, strict=True):
            x = op.run(x, slot, final, noise)
        return x.reshape(-1).float().cpu().numpy()


def _lag(ops: list[Op]) -> int:
    """How many output samples the plan holds back: each padded operation's padding, in output samples."""
    lag, scale = 0, 1
    for op in reversed(ops):
        if isinstance(op, _Residual):
            lag += _lag(op.branch) * scale
        elif isinstance(op, _TransposedConv):
            lag += op.padding * scale
            scale *= op.stride
        elif isinstance(op, _Conv):
            lag += op.padding * scale
    return lag


def _clone_state(slot: dict) -> dict:
    return {key: [_clone_state(s) for s in value] if isinstance(value, list) else value
            for key, value in slot.items()}


class StreamingDecoder:
    """Frames in as they are generated, audio out as soon as it can be played.

    The first ``first_chunk`` frames leave at once as a preview (decoded as if the answer
    ended there). After them only final samples of :class:`SNACStream` leave, in chunks of
    at least ``first_chunk`` frames, doubling up to ``max_chunk``; frames are decoded when a
    chunk needs them, so the codec runs on several frames at a time once under way.
    ``pull(final=True)`` gives the rest. The concatenation equals the offline decode of the
    whole answer but for the preview (SNR measured in the tests and benchmarks), and no
    frame is dropped.
    """

    def __init__(self, codec: StreamableCodec, first_chunk: int = 1, max_chunk: int = 16, seed: int | None = 0) -> None:
        if first_chunk < 1 or max_chunk < first_chunk:
            raise ValueError("need 1 <= first_chunk <= max_chunk")
        self.stream = SNACStream(codec, seed)
        self.first_chunk = first_chunk
        self.max_chunk = max_chunk
        self._frames: list[list[int]] = []  # pushed, not decoded yet
        self._pending = np.zeros(0, dtype=np.float32)  # final samples not given out
        self._pending_start = 0  # their position in the answer
        self._given = 0  # samples given out
        self._next_chunk = first_chunk

    @property
    def frames(self) -> int:
        return self.stream.frames + len(self._frames)

    def push(self, frame: list[int]) -> None:
        """Add one complete frame (7 codes, depth-first order)."""
        if len(frame) != NUM_AUDIO_LAYERS:
            raise ValueError(f"a frame has {NUM_AUDIO_LAYERS} codes, got {len(frame)}")
        self._frames.append([int(c) for c in frame])

    def _decode(self, final: bool = False) -> None:
        if self._frames or final:
            audio = self.stream.push(self._frames, final=final)
            self._frames = []
            self._pending = np.concatenate([self._pending, audio]) if self._pending.size else audio

    def pull(self, final: bool = False) -> np.ndarray | None:
        """The next chunk of 24 kHz float32 samples if one is ready (everything left when ``final``)."""
        if final:
            self._decode(final=True)
        elif self._given == 0:
            if self.frames < self.first_chunk:
                return None
            self._decode()
            chunk = self.stream.preview()[: self.first_chunk * SAMPLES_PER_FRAME]
            self._given = len(chunk)
            return chunk if len(chunk) else None
        else:
            size = self._next_chunk * SAMPLES_PER_FRAME
            if self.frames * SAMPLES_PER_FRAME - self.stream.lag - self._given < size:
                return None  # not enough would be final yet
            self._decode()
        behind = min(self._given - self._pending_start, len(self._pending))  # previewed: skip their final version
        if behind > 0:
            self._pending, self._pending_start = self._pending[behind:], self._pending_start + behind
        chunk, self._pending = self._pending, self._pending[:0]
        self._pending_start += len(chunk)
        self._given += len(chunk)
        self._next_chunk = min(self.max_chunk, 2 * self._next_chunk)
        return chunk if len(chunk) else None
