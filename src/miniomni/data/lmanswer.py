"""Answers written by a text language model: the text side of spoken QA data.

The paper had a stronger LM write the answers of its spoken QA data; here any checkpoint that
``init-model`` made from a chat model (SmolLM2-Instruct, Qwen2-Instruct: the ChatML template)
answers with its own text head, before any training: text on its text stream with ``_pad_a`` on
the audio streams (the layout's text position) gives the source LM's logits there. Greedy
decoding, so the same questions always get the same answers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from ..models.omni import OmniModel
from ..tokens import EOT, NUM_STREAMS, TEXT_STREAM, padding_ids

CHATML = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
ASSISTANT = "You are a helpful voice assistant. Answer in one or two short spoken sentences."
CHATML_STOPS = ("<|im_end|>", "<|endoftext|>")


@torch.inference_mode()
def answer_questions(
    model: OmniModel,
    tokenizer,
    questions: Sequence[str],
    template: str = CHATML,
    system: str = ASSISTANT,
    stops: Sequence[str] = CHATML_STOPS,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    vocab_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """The LM's greedy answer to each question (raw text, special tokens dropped), in order.

    Questions whose prompts have the same number of tokens are answered together, up to
    ``batch_size`` at a time. ``vocab_size`` limits the choice to the source LM's own text ids
    (default: the tokenizer's vocabulary). ``on_batch(n)`` is told how many were answered.
    """
    stop_ids = {tokenizer.token_to_id(s) for s in stops} - {None}
    if not stop_ids:
        raise ValueError(f"the tokenizer knows none of the stop tokens {list(stops)}")
    vocab = vocab_size or tokenizer.get_vocab_size()
    prompts = [tokenizer.encode(template.format(system=system, question=q), add_special_tokens=False).ids
               for q in questions]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(prompts):
        by_length[len(ids)].append(index)
    answers: list[str] = [""] * len(questions)
    device = model.llm.embed.weight.device
    for _, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            group = indices[start:start + batch_size]
            ids = torch.tensor([prompts[i] for i in group], device=device)
            for row, tokens in zip(group, _greedy(model, ids, stop_ids, vocab, max_new_tokens), strict=True):
                answers[row] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            if on_batch is not None:
                on_batch(len(group))
    return answers


def _text_positions(ids: torch.Tensor) -> torch.Tensor:
    """(B, L) text ids -> (B, 8, L) streams: the ids on the text stream, ``_pad_a`` on the audio streams."""
    streams = padding_ids(ids.device).view(1, NUM_STREAMS, 1).repeat(ids.shape[0], 1, ids.shape[1])
    streams[:, TEXT_STREAM] = ids
    return streams


def _greedy(model: OmniModel, ids: torch.Tensor, stop_ids: set[int], vocab: int, max_new: int) -> list[list[int]]:
    """Greedy continuations of equal-length prompts (B, L), each cut before its first stop token."""
    rows, length = ids.shape
    cache = model.new_cache(rows, length + max_new)
    streams = _text_positions(ids)
    hidden = model.hidden_states(streams, torch.arange(length, device=ids.device), cache, kv_len=length)
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for step in range(max_new):
        logits = model.text_logits(hidden[:, -1])
        # The source's words, and _eot: init-model moves the source's end of turn there.
        token = torch.cat((logits[:, :vocab], logits[:, EOT:EOT + 1]), dim=1).argmax(-1)
        token = torch.where(token == vocab, EOT, token)
        for row, value in enumerate(token.tolist()):
            if not done[row]:
                if value in stop_ids or value == EOT:
                    done[row] = True
                else:
                    out[row].append(value)
        if all(done) or step == max_new - 1:
            break
        position = length + step
        streams = _text_positions(token[:, None])
        hidden = model.hidden_states(streams, torch.tensor([position], device=ids.device), cache,
                                     kv_len=position + 1)
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def spoken_answer(text: str, max_sentences: int = 2, max_words: int = 40) -> str:
    """The first whole sentences of an LM's answer, as a voice assistant would say them.

    Markdown marks and line breaks go; an unfinished last sentence (the LM ran out of tokens) is
    dropped; at most ``max_sentences`` sentences and ``max_words`` words. Empty when nothing whole is left.
    """
    text = re.sub(r"[*#_`>]+", " ", text)
    text = re.sub(r"^\s*(\d+\.|-)\s+", " ", text, flags=re.MULTILINE)
    text = " ".join(text.split())
    kept: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        if not sentence or sentence[-1] not in ".!?":
            break
        if len(" ".join([*kept, sentence]).split()) > max_words:
            break
        kept.append(sentence)
        if len(kept) == max_sentences:
            break
    return " ".join(kept)
