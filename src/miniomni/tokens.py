"""Mini-Omni's token layout: special ids, layer shifts, SNAC frames <-> 7 layers, delay, prompts.

One vocabulary table of 181,120 rows holds the Qwen2 text block (152,000 wide) and
seven audio blocks (4,160 wide each). ``docs/decoding.md`` describes the layout, the
prompts and the delay in full.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

# Text block.
TEXT_VOCAB_SIZE = 151936  # Qwen2 tokenizer ids 0 .. 151935
TEXT_SPECIAL_TOKENS = 64
PADDED_TEXT_VOCAB_SIZE = TEXT_VOCAB_SIZE + TEXT_SPECIAL_TOKENS  # 152000
EOT = TEXT_VOCAB_SIZE  # _eot
PAD_T = TEXT_VOCAB_SIZE + 1  # _pad_t
INPUT_T = TEXT_VOCAB_SIZE + 2  # _input_t
ANSWER_T = TEXT_VOCAB_SIZE + 3  # _answer_t
ASR = TEXT_VOCAB_SIZE + 4  # _asr

# Audio blocks (local ids, per layer).
CODEBOOK_SIZE = 4096  # SNAC codes 0 .. 4095
AUDIO_SPECIAL_TOKENS = 64
PADDED_AUDIO_VOCAB_SIZE = CODEBOOK_SIZE + AUDIO_SPECIAL_TOKENS  # 4160
EOA = CODEBOOK_SIZE  # _eoa
PAD_A = CODEBOOK_SIZE + 1  # _pad_a
INPUT_A = CODEBOOK_SIZE + 2  # _input_a
ANSWER_A = CODEBOOK_SIZE + 3  # _answer_a
SPLIT = CODEBOOK_SIZE + 4  # _split

NUM_AUDIO_LAYERS = 7
NUM_STREAMS = NUM_AUDIO_LAYERS + 1  # streams 0..6 audio layers, stream 7 text
TEXT_STREAM = NUM_AUDIO_LAYERS
VOCAB_SIZE = PADDED_TEXT_VOCAB_SIZE + NUM_AUDIO_LAYERS * PADDED_AUDIO_VOCAB_SIZE  # 181120

SAMPLES_PER_FRAME = 2048  # one coarse SNAC frame at 24 kHz
# Which SNAC codebook and which index inside the frame each of the 7 layers carries
# (depth first): c0[k], c1[2k], c2[4k], c2[4k+1], c1[2k+1], c2[4k+2], c2[4k+3].
LAYER_CODEBOOK = (0, 1, 2, 2, 1, 2, 2)
LAYER_OFFSET = (0, 0, 0, 1, 1, 2, 3)
CODEBOOK_RATE = (1, 2, 4)  # codes per coarse frame


def layershift(local_id: int | torch.Tensor, layer: int) -> int | torch.Tensor:
    """Absolute vocabulary id of a local audio id (0..4159) of audio layer ``layer``."""
    return local_id + PADDED_TEXT_VOCAB_SIZE + PADDED_AUDIO_VOCAB_SIZE * layer


# Where each audio layer's block starts in the vocabulary.
LAYER_SHIFTS = tuple(layershift(0, layer) for layer in range(NUM_AUDIO_LAYERS))


def layer_shifts(device: torch.device | str | None = None) -> torch.Tensor:
    """(7,) tensor of :data:`LAYER_SHIFTS`: add it to 7 local audio ids to get absolute ones."""
    return torch.tensor(LAYER_SHIFTS, dtype=torch.long, device=device)


def padding_ids(device: torch.device | str | None = None) -> torch.Tensor:
    """(8,) absolute ids of one all-padding position: ``_pad_a`` on the 7 audio streams, ``_pad_t`` on text."""
    return torch.cat([layer_shifts(device) + PAD_A, torch.tensor([PAD_T], device=device)])


def unshift(absolute_id: int, layer: int) -> int:
    """Local audio id (0..4159) of an absolute id of audio layer ``layer``."""
    return absolute_id - PADDED_TEXT_VOCAB_SIZE - PADDED_AUDIO_VOCAB_SIZE * layer


class Task(str, enum.Enum):
    """What goes in and what comes out (``A1`` audio, ``T1`` text in; ``A2`` speech, ``T2`` text out).

    ``A1A2_BATCH`` is the paper's batch approach: an A1A2 row speaks, guided by the text of an A1T2 row.
    """

    A1A2 = "A1A2"
    A1A2_BATCH = "A1A2-batch"
    A1T2 = "A1T2"
    ASR = "asr"
    T1A2 = "T1A2"
    T1T2 = "T1T2"

    @property
    def audio_input(self) -> bool:
        return self in (Task.A1A2, Task.A1A2_BATCH, Task.A1T2, Task.ASR)

    @property
    def audio_output(self) -> bool:
        return self in (Task.A1A2, Task.A1A2_BATCH, Task.T1A2)

    @classmethod
    def parse(cls, name: str | Task) -> Task:
        if isinstance(name, Task):
            return name
        for task in cls:
            if task.value.lower() == str(name).lower():
                return task
        aliases = {"a1t1": cls.ASR, "aa-batch": cls.A1A2_BATCH, "a1a2_batch": cls.A1A2_BATCH}
        if str(name).lower() in aliases:
            return aliases[str(name).lower()]
        choices = ", ".join(t.value for t in cls)
        raise ValueError(f"unknown task {name!r}; choose one of: {choices}")


def audio_prompt(num_frames: int, task: Task) -> torch.Tensor:
    """The (8, T+3) prompt of an audio-input task with ``num_frames`` Whisper frames (absolute ids).

    For ``A1A2_BATCH`` this is item 0 (A1A2); item 1 is ``audio_prompt(n, Task.A1T2)``.
    """
    if task in (Task.A1A2, Task.A1A2_BATCH):
        last_audio, last_text = ANSWER_A, ANSWER_T
    elif task == Task.A1T2:
        last_audio, last_text = PAD_A, ANSWER_T
    elif task == Task.ASR:
        last_audio, last_text = PAD_A, ASR
    else:
        raise ValueError(f"task {task.value} does not take audio input")
    audio_local = [INPUT_A] + [PAD_A] * num_frames + [EOA, last_audio]
    text = [INPUT_T] + [PAD_T] * num_frames + [EOT, last_text]
    return _stack_streams(audio_local, text)


def text_prompt(text_ids: Sequence[int], task: Task) -> torch.Tensor:
    """The (8, n+3) prompt of a text-input task for text token ids ``t1..tn`` (absolute ids)."""
    n = len(text_ids)
    if task == Task.T1A2:
        audio_local = [PAD_A] * (n + 2) + [ANSWER_A]
    elif task == Task.T1T2:
        audio_local = [PAD_A] * (n + 3)
    else:
        raise ValueError(f"task {task.value} does not take text input")
    text = [INPUT_T, *text_ids, EOT, ANSWER_T]
    return _stack_streams(audio_local, text)


def _stack_streams(audio_local: list[int], text: list[int]) -> torch.Tensor:
    rows = [[layershift(a, layer) for a in audio_local] for layer in range(NUM_AUDIO_LAYERS)]
    rows.append(list(text))
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------- SNAC frames <-> layers


def codes_to_layers(codes: Sequence[torch.Tensor]) -> torch.Tensor:
    """SNAC codes ``[c0 (N,), c1 (2N,), c2 (4N,)]`` (batch dim of 1 allowed) -> (7, N) layer tokens."""
    flat = [c.reshape(-1) for c in codes]
    num_frames = flat[0].numel()
    for c, rate in zip(flat, CODEBOOK_RATE, strict=True):
        if c.numel() != rate * num_frames:
            raise ValueError(
                f"SNAC codebooks have {[x.numel() for x in flat]} codes; expected N, 2N, 4N"
            )
    return torch.stack(
        [
            flat[cb].view(num_frames, CODEBOOK_RATE[cb])[:, off]
            for cb, off in zip(LAYER_CODEBOOK, LAYER_OFFSET, strict=True)
        ]
    )


def layers_to_codes(layers: torch.Tensor) -> list[torch.Tensor]:
    """(7, N) layer tokens -> SNAC codes ``[c0 (1, N), c1 (1, 2N), c2 (1, 4N)]``."""
    if layers.dim() != 2 or layers.shape[0] != NUM_AUDIO_LAYERS:
        raise ValueError(f"expected (7, N) audio layers, got shape {tuple(layers.shape)}")
    num_frames = layers.shape[1]
    codes = [layers.new_empty(num_frames, rate) for rate in CODEBOOK_RATE]
    for layer, (cb, off) in enumerate(zip(LAYER_CODEBOOK, LAYER_OFFSET, strict=True)):
        codes[cb][:, off] = layers[layer]
    return [c.reshape(1, -1) for c in codes]


def delayed_frame(audio_streams: Sequence[Sequence[int]], k: int) -> list[int] | None:
    """Frame ``k`` (7 SNAC codes) of the sampled audio streams, or None if it holds a special id.

    Layer i lags the text by i + 1 steps, so frame k takes layer i's output k + i + 1
    (index 0 = the token sampled from the prompt); it is complete once layer 6 has
    given output k + 7.
    """
    frame = [int(audio_streams[layer][k + layer + 1]) for layer in range(NUM_AUDIO_LAYERS)]
    if any(code >= CODEBOOK_SIZE or code < 0 for code in frame):
        return None
    return frame


def undelay(audio_streams: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sampled audio tokens (7 lists, local ids, index 0 = sampled from the prompt) -> (7, N) frames.

    Frames stop before the first one holding a special id (>= 4096), so ``_eoa`` and the
    delay pads never reach the codec (see :func:`delayed_frame`).
    """
    if len(audio_streams) != NUM_AUDIO_LAYERS:
        raise ValueError(f"expected 7 audio streams, got {len(audio_streams)}")
    num_frames = min(len(s) - layer - 1 for layer, s in enumerate(audio_streams))
    frames: list[list[int]] = []
    for k in range(max(num_frames, 0)):
        frame = delayed_frame(audio_streams, k)
        if frame is None:
            break
        frames.append(frame)
    if not frames:
        return torch.empty(NUM_AUDIO_LAYERS, 0, dtype=torch.long)
    return torch.tensor(frames, dtype=torch.long).T.contiguous()


def delay(layers: torch.Tensor, pad: int = PAD_A, end: int | None = EOA) -> torch.Tensor:
    """(7, N) frames -> (7, N + 8) streams as the model emits them (local ids).

    Layer i gets ``i + 1`` leading ``pad`` tokens, then its N codes, then ``end`` (when
    given), then ``pad`` to the common length. Inverse of :func:`undelay`.
    """
    num_frames = layers.shape[1]
    length = num_frames + NUM_AUDIO_LAYERS + 1
    out = torch.full((NUM_AUDIO_LAYERS, length), pad, dtype=torch.long)
    for layer in range(NUM_AUDIO_LAYERS):
        out[layer, layer + 1 : layer + 1 + num_frames] = layers[layer]
        if end is not None and layer + 1 + num_frames < length:
            out[layer, layer + 1 + num_frames] = end
    return out


def layers_to_answer_snac(layers: torch.Tensor) -> str:
    """(7, N) frames -> VoiceAssistant-400K ``answer_snac`` text: ``# t1 .. t7 # t1 ..``."""
    parts: list[str] = []
    for k in range(layers.shape[1]):
        parts.append("#")
        parts.extend(str(int(code)) for code in layers[:, k])
    return " ".join(parts)


def answer_snac_to_layers(text: str) -> torch.Tensor:
    """Parse an ``answer_snac`` string into (7, N) frames; raises ValueError on malformed input."""
    frames: list[list[int]] = []
    current: list[int] | None = None
    for piece in text.split():
        if piece == "#":
            if current is not None:
                frames.append(current)
            current = []
            continue
        if current is None:
            raise ValueError("answer_snac must start with '#'")
        try:
            code = int(piece)
        except ValueError:
            raise ValueError(f"answer_snac holds a non-integer token {piece!r}") from None
        if not 0 <= code < CODEBOOK_SIZE:
            raise ValueError(f"answer_snac code {code} is outside 0..{CODEBOOK_SIZE - 1}")
        current.append(code)
    if current is not None:
        frames.append(current)
    for index, frame in enumerate(frames):
        if len(frame) != NUM_AUDIO_LAYERS:
            raise ValueError(f"answer_snac frame {index} has {len(frame)} codes, expected 7")
    if not frames:
        return torch.empty(NUM_AUDIO_LAYERS, 0, dtype=torch.long)
    return torch.tensor(frames, dtype=torch.long).T.contiguous()
