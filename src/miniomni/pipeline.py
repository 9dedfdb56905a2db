"""The loaded system: Whisper encoder + Mini-Omni model + SNAC codec + tokenizer, and ``load()``."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from .audio import load_audio, log_mel_spectrogram, trim_to_30s, whisper_frame_count
from .checkpoints import CheckpointParts, check_state_dict, convert_model_state, read_checkpoint
from .codec import Codec, StreamingDecoder
from .errors import CheckpointError, MiniOmniError
from .generate import MAX_POSITIONS, DecodeInput, SamplingOptions, Step, answer_text_ids, decode
from .models.omni import OmniModel
from .models.whisper import WhisperEncoder
from .quantize import quantize_int8
from .streaming import AudioChunk, Done, StreamEvent, TextDelta, TextStreamer, Timings
from .tokens import CODEBOOK_SIZE, NUM_AUDIO_LAYERS, Task, audio_prompt, text_prompt, undelay

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MiniOmniError("--device cuda was asked for but this PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MiniOmniError("--device mps was asked for but MPS is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None = "float32") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise MiniOmniError(f"dtype {dtype} is not supported; use float32 or bfloat16")
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32
    if dtype not in DTYPES:
        raise MiniOmniError(f"dtype {dtype!r} is not supported; use float32 or bfloat16")
    return DTYPES[dtype]


@dataclass
class GenerationResult:
    """Everything one call produced. Token lists follow ``--tokens-out`` (see :meth:`tokens_json`)."""

    task: Task
    prompt_length: int
    text_tokens: list[int]
    audio_tokens: list[list[int]]
    text: str
    audio: np.ndarray | None
    sample_rate: int = 24000

    def tokens_json(self) -> dict[str, Any]:
        """Every token sampled, in order, from the one sampled from the prompt through the stop token.

        Text ids are absolute; audio ids local (0..4159); ``audio`` is ``[]`` for text-output tasks.
        """
        return {
            "task": self.task.value,
            "prompt_length": self.prompt_length,
            "text": list(self.text_tokens),
            "audio": [list(layer) for layer in self.audio_tokens],
        }


class MiniOmni:
    """A ready-to-run Mini-Omni. Build it with :func:`load`."""

    def __init__(
        self,
        model: OmniModel,
        encoder: WhisperEncoder,
        codec: Codec,
        tokenizer: Tokenizer,
        device: torch.device,
        dtype: torch.dtype,
        fast_encoder: bool = False,
    ) -> None:
        self.model = model.eval()
        self.encoder = encoder.eval()
        self.codec = codec
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.fast_encoder = fast_encoder

    @classmethod
    def from_parts(
        cls,
        parts: CheckpointParts,
        device: torch.device,
        dtype: torch.dtype,
        quantize: str | None = None,
        fast_encoder: bool = False,
    ) -> MiniOmni:
        """Build the pipeline; ``quantize="int8"`` swaps the decoder's linears for int8 ones (bf16 activations)."""
        if quantize not in (None, "none", "int8"):
            raise MiniOmniError(f"quantize={quantize!r} is not supported; use int8 or leave it off")
        if parts.quantize == "int8":
            quantize = "int8"  # an int8 bundle holds no float weights to run without it
        if quantize == "int8" and dtype != torch.bfloat16:
            log.info("int8 weights run with bfloat16 activations; using dtype bfloat16")
            dtype = torch.bfloat16
        state = parts.model_state
        if parts.quantize is None and (quantize == "int8" or any(
                t.is_floating_point() and t.dtype != dtype for t in state.values())):
            # Convert tensor by tensor (quantizing from the stored precision), releasing the
            # memory-mapped source as we go: float32 weights are never all resident at once.
            state = convert_model_state(state, parts.config, dtype, quantize, mapped_from=parts.weights_file)
        int8 = quantize == "int8"
        with torch.device("meta"):
            model = OmniModel(parts.config)
            if int8:
                quantize_int8(model.llm)
        check_state_dict(model, state, "the Mini-Omni weights")
        tied = parts.config.tie_word_embeddings and not int8
        model.load_state_dict(state, strict=not tied, assign=True)
        if tied:
            model.llm.lm_head.weight = model.llm.embed.weight
        model.llm.init_rope()  # the meta-device tables were never filled
        model = model.to(device=device, dtype=dtype)
        model.requires_grad_(False)
        encoder = WhisperEncoder.from_state_dict(parts.whisper_dims, parts.whisper_state, device=device)
        encoder.requires_grad_(False)
        codec = Codec.from_state_dict(parts.snac_config, parts.snac_state, device)
        try:
            tokenizer = Tokenizer.from_str(parts.tokenizer_json)
        except Exception as exc:  # the tokenizers library raises plain Exception
            raise CheckpointError(
                f"tokenizer.json could not be read ({exc}); it is probably incomplete. Delete it and "
                "download it again with `miniomni download DIR`"
            ) from exc
        return cls(model, encoder, codec, tokenizer, device, dtype, fast_encoder=fast_encoder)

    # ------------------------------------------------------------------ inputs

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.bfloat16 and self.device.type in ("cpu", "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def encode_audio(self, audio_16k: np.ndarray) -> torch.Tensor:
        """16 kHz mono waveform (<= 30 s) -> (1, T, whisper_dim) Whisper features, T as SPEC section 1."""
        frames = whisper_frame_count(len(audio_16k))
        # On the CPU, as the reference does: a GPU FFT differs in the low bits.
        mel = log_mel_spectrogram(audio_16k).to(self.device)
        if self.fast_encoder:  # opt-in: encode only the frames that are kept, not 30 s
            mel = mel[:, : 2 * frames]
        with self._autocast():
            features = self.encoder(mel.unsqueeze(0), allow_short=self.fast_encoder)
        return features[:, :frames].float()

    def encode_text(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise MiniOmniError("the input text is empty; give a question or instruction to answer")
        return ids

    def prepare(
        self,
        task: Task | str | None = None,
        audio: Any = None,
        text: str | None = None,
        sample_rate: int | None = None,
    ) -> DecodeInput:
        """Build the prompt rows (and Whisper features) of a task from audio or text input."""
        if audio is not None and text is not None:
            raise MiniOmniError("give either audio or text input, not both")
        if audio is None and text is None:
            raise MiniOmniError("no input: give audio (a WAV file, bytes or an array) or text")
        if task is None:
            task = Task.A1A2_BATCH if audio is not None else Task.T1A2
        task = Task.parse(task)
        if task.audio_input and audio is None:
            raise MiniOmniError(f"task {task.value} takes audio input; pass --audio")
        if not task.audio_input and text is None:
            raise MiniOmniError(f"task {task.value} takes text input; pass --text")
        if task.audio_input:
            waveform, _ = trim_to_30s(load_audio(audio, sample_rate))
            features = self.encode_audio(waveform)
            frames = features.shape[1]
            if task == Task.A1A2_BATCH:
                prompts = torch.stack([audio_prompt(frames, Task.A1A2), audio_prompt(frames, Task.A1T2)])
                return DecodeInput(task, prompts, features.expand(2, -1, -1), [frames, frames])
            return DecodeInput(task, audio_prompt(frames, task).unsqueeze(0), features, [frames])
        ids = self.encode_text(text)
        if len(ids) + 3 >= MAX_POSITIONS:
            raise MiniOmniError(
                f"the input text is {len(ids)} tokens long; at most {MAX_POSITIONS - 4} fit in the context"
            )
        return DecodeInput(task, text_prompt(ids, task).unsqueeze(0))

    # ----------------------------------------------------------------- outputs

    def steps(
        self,
        inputs: DecodeInput,
        options: SamplingOptions | None = None,
        max_new_tokens: int | None = None,
    ) -> Iterator[Step]:
        """The decode loop of :mod:`miniomni.generate` on this model."""
        return decode(self.model, inputs, options, max_new_tokens)

    def decode_text(self, text_tokens: list[int], task: Task | str = Task.A1A2, ended_on_eoa: bool = False) -> str:
        """The answer text from every sampled text token (see :func:`generate.answer_text_ids`)."""
        ids = answer_text_ids(Task.parse(task), text_tokens, ended_on_eoa)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def decode_audio(self, audio_tokens: list[list[int]], seed: int | None = 0) -> np.ndarray:
        """Sampled audio streams (7 lists of local ids) -> 24 kHz float32 waveform."""
        return self.codec.decode(undelay(audio_tokens), seed=seed)

    def stream(
        self,
        task: Task | str | None = None,
        *,
        audio: Any = None,
        text: str | None = None,
        sample_rate: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        first_chunk: int = 1,
        max_chunk: int = 16,
    ) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, but yields events as they happen.

        ``TextDelta`` as text arrives, ``AudioChunk`` (24 kHz float32) as soon as frames can be
        decoded (the first after ``first_chunk`` frames; later chunks up to ``max_chunk`` frames),
        and one final ``Done`` with the whole text, every token and the :class:`Timings`.
        """
        started = time.perf_counter()
        options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        inputs = self.prepare(task, audio=audio, text=text, sample_rate=sample_rate)
        events = AnswerEvents(self, inputs, started, first_chunk=first_chunk, max_chunk=max_chunk)
        for step in self.steps(inputs, options, max_new_tokens):
            yield from events.on_step(step)
        yield from events.finish()

    def generate(
        self,
        task: Task | str | None = None,
        *,
        audio: Any = None,
        text: str | None = None,
        sample_rate: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> GenerationResult:
        """Answer one question. Speech-output tasks also return the 24 kHz waveform.

        The task defaults to ``A1A2-batch`` for audio input and ``T1A2`` for text input.
        Greedy unless ``temperature > 0``.
        """
        options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        inputs = self.prepare(task, audio=audio, text=text, sample_rate=sample_rate)
        text_tokens: list[int] = []
        audio_tokens: list[list[int]] = [[] for _ in range(NUM_AUDIO_LAYERS)] if inputs.task.audio_output else []
        ended_on_eoa = False
        for step in self.steps(inputs, options, max_new_tokens):
            ended_on_eoa = step.end == "eoa"
            text_tokens.append(step.text)
            if step.audio is not None:
                for layer, token in enumerate(step.audio):
                    audio_tokens[layer].append(token)
        waveform = self.decode_audio(audio_tokens) if inputs.task.audio_output else None
        return GenerationResult(
            task=inputs.task,
            prompt_length=inputs.prompt_length,
            text_tokens=text_tokens,
            audio_tokens=audio_tokens,
            text=self.decode_text(text_tokens, inputs.task, ended_on_eoa),
            audio=waveform,
            sample_rate=self.codec.sample_rate,
        )


def load(
    path_or_repo: str | os.PathLike = "gpt-omni/mini-omni",
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "float32",
    quantize: str | None = None,
    fast_encoder: bool = False,
) -> MiniOmni:
    """Load a checkpoint directory (published layout), a ``.safetensors`` bundle or a hub repo id.

    ``dtype`` float32 (faithful default) or bfloat16; ``quantize="int8"`` for int8 weights;
    ``fast_encoder`` runs Whisper on the real audio only instead of 30 s (faster, not faithful).
    """
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype)
    source = path_or_repo if isinstance(path_or_repo, str) else Path(path_or_repo)
    parts = read_checkpoint(source)
    log.info("loaded %s onto %s as %s", path_or_repo, resolved_device, resolved_dtype)
    return MiniOmni.from_parts(parts, resolved_device, resolved_dtype, quantize=quantize, fast_encoder=fast_encoder)


class AnswerEvents:
    """Turns the sampled steps of one answer into stream events (text deltas, audio chunks, Done).

    Shared by :meth:`MiniOmni.stream` and the server, which calls it off the decode thread.
    Times are measured from ``started`` (when the question was in hand).
    """

    def __init__(self, omni: MiniOmni, inputs: DecodeInput, started: float, first_chunk: int = 1,
                 max_chunk: int = 16) -> None:
        self.omni = omni
        self.inputs = inputs
        self.started = started
        self.timings = Timings(prepare_ms=(time.perf_counter() - started) * 1000)
        self.streamer = TextStreamer(lambda ids: omni.tokenizer.decode(ids, skip_special_tokens=True))
        self.ended_on_eoa = False
        self.decoder = StreamingDecoder(omni.codec, first_chunk=first_chunk, max_chunk=max_chunk)
        self.text_tokens: list[int] = []
        self.audio_tokens: list[list[int]] = [[] for _ in range(NUM_AUDIO_LAYERS)] if inputs.task.audio_output else []
        self.audio_done = False
        self.samples_out = 0
        self.step_times: list[float] = []
        self._last_step: float | None = None
        self._codec_seconds = 0.0

    def on_step(self, step: Step, when: float | None = None) -> list[StreamEvent]:
        """Events for one sampled step; ``when`` is when it was sampled (default: now)."""
        when = time.perf_counter() if when is None else when
        if step.index == 0:
            self.timings.first_token_ms = (when - self.started) * 1000
        elif self._last_step is not None:
            # Codec work done in between, on this thread, is not decode-step time.
            self.step_times.append(when - self._last_step - self._codec_seconds)
        self._last_step, self._codec_seconds = when, 0.0
        events: list[StreamEvent] = []
        self.text_tokens.append(step.text)
        self.ended_on_eoa = step.end == "eoa"
        delta = self.streamer.update(answer_text_ids(self.inputs.task, self.text_tokens, self.ended_on_eoa))
        if delta:
            events.append(TextDelta(delta))
        if step.audio is None:
            return events
        for layer, token in enumerate(step.audio):
            self.audio_tokens[layer].append(token)
        frame_index = step.index - NUM_AUDIO_LAYERS  # frame k is complete once layer 6 gave output k + 7
        if frame_index >= 0 and not self.audio_done:
            frame = [self.audio_tokens[layer][frame_index + layer + 1] for layer in range(NUM_AUDIO_LAYERS)]
            if any(code >= CODEBOOK_SIZE for code in frame):
                self.audio_done = True
            else:
                self.decoder.push(frame)
                events += self._chunk(final=False)
        return events

    def _chunk(self, final: bool) -> list[StreamEvent]:
        began = time.perf_counter()
        chunk = self.decoder.pull(final=final)
        self._codec_seconds += time.perf_counter() - began
        if chunk is None or len(chunk) == 0:
            return []
        if self.timings.first_audio_ms is None:
            self.timings.first_audio_ms = (time.perf_counter() - self.started) * 1000
        event = AudioChunk(chunk, self.samples_out, self.omni.codec.sample_rate)
        self.samples_out += len(chunk)
        return [event]

    def finish(self) -> list[StreamEvent]:
        """The last audio and text, then Done."""
        events: list[StreamEvent] = self._chunk(final=True) if self.inputs.task.audio_output else []
        tail = self.streamer.flush()
        if tail:
            events.append(TextDelta(tail))
        t = self.timings
        t.total_ms = (time.perf_counter() - self.started) * 1000
        t.steps = len(self.text_tokens)
        if self.step_times:
            t.step_ms_median = float(np.median(self.step_times) * 1000)
            t.steps_per_second = len(self.step_times) / max(sum(self.step_times), 1e-9)
        t.audio_seconds = self.samples_out / self.omni.codec.sample_rate
        if self.samples_out:
            t.real_time_factor = t.total_ms / 1000 / t.audio_seconds
        events.append(Done(
            text=self.omni.decode_text(self.text_tokens, self.inputs.task, self.ended_on_eoa),
            text_tokens=self.text_tokens,
            audio_tokens=self.audio_tokens,
            task=self.inputs.task.value,
            prompt_length=self.inputs.prompt_length,
            timings=t,
        ))
        return events
