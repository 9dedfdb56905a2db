"""Decoding: sampling, the per-task feeding rules and the KV-cached step loop (``docs/decoding.md``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .cooperative import Steps, run
from .errors import ConfigError
from .models.llm import KVCache
from .models.omni import OmniModel
from .tokens import (
    EOA,
    EOT,
    PAD_A,
    PAD_T,
    TEXT_VOCAB_SIZE,
    Task,
    layer_shifts,
)

# The reference caps prompt + generated at 2048 positions.
MAX_POSITIONS = 2048


@dataclass
class SamplingOptions:
    """top-k, then temperature, then top-p, then a draw. ``temperature == 0`` or ``top_k == 1`` is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is not None:
            generator.manual_seed(self.seed)
        else:
            generator.seed()
        return generator


def sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one id per row of (N, V) logits."""
    if options.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if options.top_k is not None and options.top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, options.top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
    logits = logits / options.temperature
    if options.top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - options.top_p)
        remove[..., -1:] = False  # always keep the most probable token
        logits = logits.masked_fill(remove.scatter(-1, sorted_indices, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@dataclass
class Step:
    """The tokens sampled at one step: text (absolute id) and, for speech output, 7 local audio ids."""

    index: int
    text: int
    audio: list[int] | None
    end: str | None = None  # set on the last step: "eoa", "eot" or "length"


@dataclass
class DecodeInput:
    """A prepared prompt: (B, 8, T) stream ids and, for audio input, Whisper features per row."""

    task: Task
    prompts: torch.Tensor
    audio_features: torch.Tensor | None = None
    audio_lengths: list[int] = field(default_factory=list)

    @property
    def prompt_length(self) -> int:
        return self.prompts.shape[-1]


def answer_text_ids(task: Task, steps_text: list[int], ended_on_eoa: bool = False) -> list[int]:
    """The text ids of an answer, as the reference decodes them, from every sampled text token.

    Speech answers are cut at the first ``_eot``; the step that emitted ``_eoa`` is not part of
    the answer (the reference stops before keeping it). Text answers stop at an ``_eot`` from
    the second step on (an ``_eot`` sampled from the prompt is not a stop). Special ids go.
    """
    ids = steps_text[:-1] if ended_on_eoa else steps_text
    start = 0 if task.audio_output else 1
    if EOT in ids[start:]:
        ids = ids[: ids.index(EOT, start)]
    return [t for t in ids if t < TEXT_VOCAB_SIZE]


def max_new_tokens_for(prompt_length: int, requested: int | None) -> int:
    """How many tokens may be sampled: the request, capped so prompt + generated <= 2048."""
    cap = MAX_POSITIONS - prompt_length
    if cap < 1:
        raise ConfigError(f"the prompt is {prompt_length} positions long; at most {MAX_POSITIONS - 1} fit")
    if requested is None:
        return cap
    if requested < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {requested}")
    return min(requested, cap)


class AnswerState:
    """The decoding rules of one answer, apart from the forward passes.

    Whoever runs the model (``decode`` for one answer, a server batching many) asks which
    head rows to compute, hands over their outputs with :meth:`advance`, and feeds
    :meth:`next_ids` at :attr:`position`. Rules (``docs/decoding.md``): text-output tasks feed
    ``_pad_a`` on the audio streams and stop at ``_eot``; speech-output tasks feed the
    sampled audio back, feed ``_pad_t`` once the text has emitted ``_eot`` (recorded as
    ``_pad_t``), and stop when audio layer 6 emits ``_eoa``. ``A1A2-batch`` has two rows
    (A1A2, A1T2): audio is sampled from row 0, text from row 1; row 0 is fed the audio,
    row 1 ``_pad_a``, both the text. As in the reference, stop conditions are first
    checked on the second sampled step.
    """

    def __init__(self, inputs: DecodeInput, options: SamplingOptions | None, max_new_tokens: int | None,
                 device: torch.device) -> None:
        self.options = options or SamplingOptions()
        self.task = inputs.task
        self.rows, _, self.prompt_length = inputs.prompts.shape
        if self.task == Task.A1A2_BATCH and self.rows != 2:
            raise ValueError("A1A2-batch needs a batch of two prompts (A1A2, A1T2)")
        self.budget = max_new_tokens_for(self.prompt_length, max_new_tokens)
        self.text_row = 1 if self.task == Task.A1A2_BATCH else 0
        self.audio_out = self.task.audio_output
        self.generator = self.options.generator(device)
        self.layer_offsets = layer_shifts(device)
        self.index = 0  # the step about to be sampled
        self.text_ended = False
        self.finished = False
        # Benchmarks on random weights (which never end their text) set the step whose text token is
        # _eot, as a real speech answer's text ends before its speech.
        self.text_end_step: int | None = None
        self._last: Step | None = None
        self._audio_ids: torch.Tensor | None = None

    @property
    def needs_text_head(self) -> bool:
        """False once a speech answer's text has ended: its text token is then _pad_t, unsampled."""
        return not (self.audio_out and self.text_ended) and self.index != self.text_end_step

    @property
    def needs_audio_head(self) -> bool:
        return self.audio_out

    @property
    def position(self) -> int:
        """Where :meth:`next_ids` goes: the last sampled token is fed there."""
        return self.prompt_length + self.index - 1

    def advance(self, text_logits: torch.Tensor | None, audio_logits: torch.Tensor | None) -> Step:
        """Sample this step from (1, V) text logits of the text row and (7, 4160) audio logits of row 0."""
        if self.finished:
            raise RuntimeError("the answer is already finished")
        if self.needs_text_head:
            text_token = int(sample(text_logits, self.options, self.generator)[0])
        elif self.index == self.text_end_step and not self.text_ended:
            text_token = EOT
        else:
            text_token = PAD_T
        audio_tokens: list[int] | None = None
        if self.audio_out:
            self._audio_ids = sample(audio_logits, self.options, self.generator)
            audio_tokens = self._audio_ids.tolist()
        step = Step(self.index, text_token, audio_tokens)
        if self.index > 0:
            if self.audio_out and audio_tokens[-1] == EOA:
                self.finished, step.end = True, "eoa"
            elif text_token == EOT:
                if self.audio_out:
                    self.text_ended = True
                else:
                    self.finished, step.end = True, "eot"
        self.index += 1
        if self.index >= self.budget and not self.finished:
            self.finished, step.end = True, "length"
        self._last = step
        return step

    def next_ids(self) -> torch.Tensor:
        """(rows, 8) ids that feed the last sampled step back."""
        ids = (self.layer_offsets + PAD_A).repeat(self.rows, 1)
        if self.audio_out:
            ids[0] = self.layer_offsets + self._audio_ids
        text = torch.full((self.rows, 1), self._last.text, dtype=torch.long, device=ids.device)
        return torch.cat([ids, text], dim=1)


@torch.inference_mode()
def decode(
    model: OmniModel,
    inputs: DecodeInput,
    options: SamplingOptions | None = None,
    max_new_tokens: int | None = None,
) -> Iterator[Step]:
    """Yield every sampled step, from the one sampled from the prompt up to and including the stop token.

    The rules are :class:`AnswerState`'s; only the head rows that are used are computed.
    """
    device = model.llm.embed.weight.device
    state = AnswerState(inputs, options, max_new_tokens, device)
    cache = model.new_cache(state.rows, max_length=state.prompt_length + state.budget)
    hidden = prefill(model, inputs.prompts.to(device), inputs, cache)
    while True:
        text_logits = model.text_logits(hidden[state.text_row]) if state.needs_text_head else None
        audio_logits = model.audio_logits(hidden[0, -1]) if state.needs_audio_head else None
        yield state.advance(text_logits, audio_logits)
        if state.finished:
            return
        position = state.position
        hidden = model.hidden_states(state.next_ids().unsqueeze(-1), torch.tensor([position], device=device), cache,
                                     kv_len=position + 1)


def prefill(model: OmniModel, prompts: torch.Tensor, inputs: DecodeInput, cache: KVCache) -> torch.Tensor:
    """Run the prompt through the model, filling ``cache``; returns the last position's hidden state (B, 1, C).

    Rows whose prompts (and Whisper features) agree on a prefix share its computation:
    the A1A2-batch rows differ only at their last position, so the prefix runs once
    and its keys and values are copied to the other row.
    """
    return run(prefill_steps(model, prompts, inputs, cache))


def prefill_steps(model: OmniModel, prompts: torch.Tensor, inputs: DecodeInput, cache: KVCache) -> Steps[torch.Tensor]:
    """:func:`prefill` one block at a time (see :mod:`miniomni.cooperative`)."""
    device = prompts.device
    rows, _, length = prompts.shape
    features = inputs.audio_features.to(device) if inputs.audio_features is not None else None
    lengths = inputs.audio_lengths or None
    shared = _shared_prefix(prompts, features, lengths)
    if shared == 0:
        hidden = yield from model.hidden_states_steps(prompts, torch.arange(length, device=device), cache, features,
                                                      lengths, kv_len=length)
        return hidden[:, -1:]
    yield from model.hidden_states_steps(prompts[:1, :, :shared], torch.arange(shared, device=device),
                                         cache.rows(slice(0, 1)), None if features is None else features[:1],
                                         None if lengths is None else lengths[:1], kv_len=shared)
    for keys, values in zip(cache.keys, cache.values, strict=True):
        keys[1:, :, :shared] = keys[:1, :, :shared]
        values[1:, :, :shared] = values[:1, :, :shared]
    # The injected Whisper frames sit at positions 1..T, all inside the shared prefix.
    hidden = yield from model.hidden_states_steps(prompts[:, :, shared:], torch.arange(shared, length, device=device),
                                                  cache, kv_len=length)
    return hidden[:, -1:]


def _shared_prefix(prompts: torch.Tensor, features: torch.Tensor | None, lengths: list[int] | None) -> int:
    rows, _, length = prompts.shape
    if rows < 2:
        return 0
    if features is not None:
        if len(set(lengths or [])) > 1 or not all(torch.equal(features[0], features[r]) for r in range(1, rows)):
            return 0
    same = (prompts == prompts[:1]).all(dim=1).all(dim=0)  # (T,) positions equal across rows and streams
    differing = (~same).nonzero()
    shared = min(int(differing[0]) if len(differing) else length - 1, length - 1)
    if features is not None and lengths and shared <= lengths[0]:
        return 0  # the injected frames (positions 1..T) must all lie in the shared prefix
    return shared

