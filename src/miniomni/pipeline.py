"""The loaded system: Whisper encoder + Mini-Omni model + SNAC codec + tokenizer, and ``load()``."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from tokenizers import Tokenizer
from typing_extensions import Unpack

from .audio import (
    ENCODER_CONTEXTS,
    N_FRAMES,
    OUTPUT_SAMPLE_RATE,
    encoder_mel_frames,
    load_audio,
    log_mel_spectrogram,
    trim_to_30s,
    whisper_frame_count,
)
from .calibration import calibration_ids
from .checkpoints import CheckpointParts, check_state_dict, convert_model_state, read_checkpoint
from .codec import Codec
from .cooperative import Steps, run, within
from .devices import autocast, resolve_device
from .errors import CheckpointError, MiniOmniError
from .generate import MAX_POSITIONS, DecodeInput, SamplingOptions, Step, answer_text_ids, decode
from .int8act import use_int8_activations
from .models.omni import OmniModel
from .models.whisper import WhisperEncoder
from .precision import Plan, Precision, choose, fast_bfloat16
from .quantize import MAX_DECODE_ROWS, attach_outliers, parse_quantize, quantize_int8
from .streaming import AnswerEvents, AnswerTokens, StreamEvent
from .tokens import Task, audio_prompt, text_prompt, undelay

log = logging.getLogger(__name__)


def check_encoder_context(context: str) -> str:
    """``context`` if it is one of :data:`miniomni.audio.ENCODER_CONTEXTS`, else a MiniOmniError naming them."""
    if not isinstance(context, str) or context not in ENCODER_CONTEXTS:
        raise MiniOmniError(f"encoder_context {context!r} is not one of {', '.join(map(repr, ENCODER_CONTEXTS))}: "
                            "seconds of audio Whisper attends over (30, as the reference; 10 or 5), or 'audio' "
                            "(the question only)")
    return context


# What each encoder context does to real Whisper features (Whisper base on Piper speech, mean cosine similarity to
# the 30 s window's, benchmarks/encoder_context.py; docs/quality.md).
_CONTEXT_COST = {"30": "the reference's features", "10": "features at cosine 0.993 to the 30 s window's",
                 "5": "features at cosine 0.985 to the 30 s window's, transcripts start to fail",
                 "audio": "features at cosine 0.964 to the 30 s window's, transcripts often fail"}


def describe_encoder_context(context: str) -> str:
    """A few words: what Whisper attends over, and what that costs in quality."""
    heard = "its whole 30 s window" if context == "30" else (
        "the question alone" if context == "audio" else f"the question padded to the next {context} s")
    return f"Whisper attends over {heard} ({_CONTEXT_COST[check_encoder_context(context)]})"


class Question(TypedDict, total=False):
    """What :meth:`MiniOmni.generate` and :meth:`MiniOmni.stream` take besides the task.

    ``audio`` (a file, bytes or an array with ``sample_rate``) or ``text``; ``max_new_tokens``
    caps the answer; ``temperature`` > 0 samples (``top_k``, ``top_p``, ``seed``), else greedy.
    """

    audio: Any
    text: str | None
    sample_rate: int | None
    max_new_tokens: int | None
    temperature: float
    top_k: int | None
    top_p: float
    seed: int | None


@dataclass
class GenerationResult:
    """Everything one call produced. Token lists follow ``--tokens-out`` (see :meth:`tokens_json`)."""

    task: Task
    prompt_length: int
    text_tokens: list[int]
    audio_tokens: list[list[int]]
    text: str
    audio: np.ndarray | None
    sample_rate: int = OUTPUT_SAMPLE_RATE

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
        encoder_context: str = "30",
        plan: Plan | None = None,
    ) -> None:
        self.model = model.eval()
        self.encoder = encoder.eval()
        self.codec = codec
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype  # the decoder's activations
        self.encoder_context = check_encoder_context(encoder_context)
        self.plan = plan or Plan(weights=str(dtype).removeprefix("torch."), activations=dtype,
                                 encoder=dtype, codec=codec.stream_dtype)

    @classmethod
    def from_parts(
        cls,
        parts: CheckpointParts,
        device: torch.device,
        precision: Precision | None = None,
        encoder_context: str = "30",
    ) -> MiniOmni:
        """Build the pipeline; ``precision.quantize="int8"`` swaps the decoder's linears for int8 ones.

        ``"auto"`` precisions are chosen for the machine (:func:`miniomni.precision.choose`);
        ``encoder_context`` as for :func:`load`.
        """
        check_encoder_context(encoder_context)
        precision = precision or Precision()
        quantize = parse_quantize(precision.quantize)
        if parts.quantize == "int8":
            quantize = "int8"  # an int8 bundle holds no float weights to run without it
        plan = choose(device, replace(precision, quantize=quantize))
        dtype = plan.activations
        state = parts.model_state
        if parts.quantize is None and (quantize == "int8" or any(
                t.is_floating_point() and t.dtype != dtype for t in state.values())):
            # Convert tensor by tensor (quantizing from the stored precision), releasing the
            # memory-mapped source as we go: float32 weights are never all resident at once.
            # int8 weights keep the other tensors in bfloat16 whatever the activations, as an int8
            # bundle stores them: one int8 model gives one answer however it was loaded.
            # int8 weights are smoothed and their outlier channels chosen on calibration text first.
            stored = torch.bfloat16 if quantize == "int8" else dtype
            calibration = calibration_ids(parts.tokenizer_json) if quantize == "int8" else None
            state = convert_model_state(state, parts.config, stored, quantize, mapped_from=parts.weights_file,
                                        calibration=calibration)
        int8 = quantize == "int8"
        with torch.device("meta"):
            model = OmniModel(parts.config)
            if int8:
                quantize_int8(model.llm)
                entries = len(state)
                state = attach_outliers(model, state)
                plan = replace(plan, calibrated=len(state) < entries)
        check_state_dict(model, state, "the Mini-Omni weights")
        tied = parts.config.tie_word_embeddings and not int8
        model.load_state_dict(state, strict=not tied, assign=True)
        if tied:
            model.llm.lm_head.weight = model.llm.embed.weight
        model.llm.init_rope()  # the meta-device tables were never filled
        model = model.to(device=device, dtype=dtype)
        model.requires_grad_(False)
        if plan.int8_activations:
            # Prompts too where that is faster: not where the CPU has bfloat16 instructions (measured:
            # 348 ms against 255 ms for a 179-position prefill there; 867 ms against 1047 ms without).
            use_int8_activations(model.llm, plan.int8_activations,
                                 max_rows=MAX_DECODE_ROWS if fast_bfloat16(device) else None)
        encoder = WhisperEncoder.from_state_dict(parts.whisper_dims, parts.whisper_state, device=device)
        encoder.requires_grad_(False)
        codec = Codec.from_state_dict(parts.snac_config, parts.snac_state, device, stream_dtype=plan.codec)
        try:
            tokenizer = Tokenizer.from_str(parts.tokenizer_json)
        except Exception as exc:  # the tokenizers library raises plain Exception
            raise CheckpointError(
                f"tokenizer.json could not be read ({exc}); it is probably incomplete. Delete it and "
                "download it again with `miniomni download DIR`"
            ) from exc
        return cls(model, encoder, codec, tokenizer, device, dtype, encoder_context=encoder_context, plan=plan)

    # ------------------------------------------------------------------ inputs

    def encode_audio(self, audio_16k: np.ndarray) -> torch.Tensor:
        """16 kHz mono waveform (<= 30 s) -> (1, T, whisper_dim) Whisper features (T: :func:`whisper_frame_count`)."""
        return run(self.encode_audio_steps(audio_16k))

    def encode_audio_steps(self, audio_16k: np.ndarray) -> Steps[torch.Tensor]:
        """:meth:`encode_audio` one encoder block at a time (see :mod:`miniomni.cooperative`)."""
        frames = whisper_frame_count(len(audio_16k))
        with torch.inference_mode():
            # On the CPU, as the reference does: a GPU FFT differs in the low bits.
            # The first frames of the 30 s window: how much audio Whisper attends over (encoder_context).
            mel_frames = encoder_mel_frames(len(audio_16k), self.encoder_context)
            mel = log_mel_spectrogram(audio_16k)[:, :mel_frames].to(self.device)
        yield
        encode = self.encoder.forward_steps(mel.unsqueeze(0), allow_short=mel_frames < N_FRAMES)
        features = yield from within(self._encoder_scope, encode)
        with torch.inference_mode():
            return features[:, :frames].float()

    def _encoder_scope(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast(self.device, self.plan.encoder))
        return stack

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
        return run(self.prepare_steps(task, audio, text, sample_rate))

    def prepare_steps(
        self,
        task: Task | str | None = None,
        audio: Any = None,
        text: str | None = None,
        sample_rate: int | None = None,
    ) -> Steps[DecodeInput]:
        """:meth:`prepare` in units of work: reading the audio, then each encoder block."""
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
            yield
            features = yield from self.encode_audio_steps(waveform)
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

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ids, special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_text(self, text_tokens: list[int], task: Task | str = Task.A1A2, ended_on_eoa: bool = False) -> str:
        """The answer text from every sampled text token (see :func:`generate.answer_text_ids`)."""
        return self.detokenize(answer_text_ids(Task.parse(task), text_tokens, ended_on_eoa)).strip()

    def decode_audio(self, audio_tokens: list[list[int]], seed: int | None = 0) -> np.ndarray:
        """Sampled audio streams (7 lists of local ids) -> 24 kHz float32 waveform."""
        return self.codec.decode(undelay(audio_tokens), seed=seed)

    def answer_events(self, inputs: DecodeInput, started: float, first_chunk: int = 1,
                      max_chunk: int = 16) -> AnswerEvents:
        """The stream events of one answer to ``inputs`` (see :class:`streaming.AnswerEvents`)."""
        return AnswerEvents(inputs.task, inputs.prompt_length, self.codec, self.detokenize, started,
                            first_chunk=first_chunk, max_chunk=max_chunk)

    def _begin(self, task: Task | str | None, question: Question) -> tuple[DecodeInput, Iterator[Step]]:
        unknown = set(question) - set(Question.__annotations__)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(unknown))}; "
                            f"a question takes {', '.join(Question.__annotations__)}")
        options = SamplingOptions(temperature=question.get("temperature", 0.0), top_k=question.get("top_k"),
                                  top_p=question.get("top_p", 1.0), seed=question.get("seed"))
        inputs = self.prepare(task, audio=question.get("audio"), text=question.get("text"),
                              sample_rate=question.get("sample_rate"))
        return inputs, self.steps(inputs, options, question.get("max_new_tokens"))

    def stream(self, task: Task | str | None = None, *, first_chunk: int = 1, max_chunk: int = 16,
               **question: Unpack[Question]) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, but yields events as they happen.

        ``TextDelta`` as text arrives, ``AudioChunk`` (24 kHz float32) as soon as frames can be
        decoded (the first after ``first_chunk`` frames; later chunks up to ``max_chunk`` frames),
        and one final ``Done`` with the whole text, every token and the :class:`Timings`.
        """
        started = time.perf_counter()
        inputs, steps = self._begin(task, question)
        events = self.answer_events(inputs, started, first_chunk=first_chunk, max_chunk=max_chunk)
        for step in steps:
            yield from events.on_step(step)
        yield from events.finish()

    def generate(self, task: Task | str | None = None, **question: Unpack[Question]) -> GenerationResult:
        """Answer one question (see :class:`Question`). Speech-output tasks also return the 24 kHz waveform.

        The task defaults to ``A1A2-batch`` for audio input and ``T1A2`` for text input.
        Greedy unless ``temperature > 0``.
        """
        inputs, steps = self._begin(task, question)
        tokens = AnswerTokens(inputs.task)
        for step in steps:
            tokens.add(step)
        return GenerationResult(
            task=inputs.task,
            prompt_length=inputs.prompt_length,
            text_tokens=tokens.text,
            audio_tokens=tokens.audio,
            text=self.detokenize(tokens.answer_text_ids()).strip(),
            audio=self.decode_audio(tokens.audio) if inputs.task.audio_output else None,
            sample_rate=self.codec.sample_rate,
        )


def load(
    path_or_repo: str | os.PathLike = "gpt-omni/mini-omni",
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    quantize: str | None = None,
    encoder_context: str = "30",
    encoder_dtype: str | torch.dtype = "auto",
    codec_dtype: str | torch.dtype = "auto",
    int8_activations: str = "auto",
) -> MiniOmni:
    """Load a checkpoint directory (published layout), a ``.safetensors`` bundle or a hub repo id.

    ``dtype`` is the decoder's activations: ``auto`` (the default) is float32 (faithful) with
    float weights, and with ``quantize="int8"`` bfloat16 where the machine runs it fast;
    ``encoder_dtype`` and ``codec_dtype`` likewise; ``int8_activations`` (auto, on, off): int8
    weights times int8 activations where fbgemm runs (see :func:`miniomni.precision.choose`).
    ``encoder_context`` is how much audio Whisper attends over: ``"30"`` (the default) its whole
    30 s window, as the reference does (faithful); ``"10"`` or ``"5"`` the question padded to the
    next multiple of 10 s or 5 s; ``"audio"`` the question alone (fastest, the features differ most).
    """
    check_encoder_context(encoder_context)
    resolved_device = resolve_device(device)
    source = path_or_repo if isinstance(path_or_repo, str) else Path(path_or_repo)
    parts = read_checkpoint(source)
    precision = Precision(quantize, dtype or "auto", encoder_dtype, codec_dtype, int8_activations)
    omni = MiniOmni.from_parts(parts, resolved_device, precision, encoder_context=encoder_context)
    log.info("loaded %s onto %s: %s; %s; %s", path_or_repo, resolved_device, omni.plan.describe(),
             omni.plan.quality(), describe_encoder_context(encoder_context))
    return omni
