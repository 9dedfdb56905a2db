"""A source LM's tables grown to the 181,120-row Mini-Omni layout, plus a fresh audio adapter.

Two ways to fill the new rows (``rows=``):

* ``"prompt"`` (what ``init-model`` writes): the grown model reads a text prompt in the Mini-Omni
  layout as the source LM reads the same text. The model's input at a position is the *mean* of
  its 8 stream embeddings, and a text position carries ``_pad_a`` on its 7 audio streams; so every
  audio row and every unused text row of the input table is zero, and the source's text rows are
  stored 8 times larger: a text token then reaches the first layer exactly as the source's own
  embedding. The prompt's specials start as the source's nearest tokens (``_input_t`` as
  ``<|im_start|>``, ``_eot`` as ``<|im_end|>``, ``_answer_t`` as a newline, ``_asr`` as
  " transcript", where the tokenizer has them), and the source's end-of-turn output row moves to
  ``_eot`` (the source's own row is zero), so answers end with ``_eot`` where the source would end
  them. The output table stays at the source's scale, so it is stored apart from the input table
  (never tied); its unused text rows are zero and its audio rows the mean row plus noise. Audio
  adapter positions carry 7/8 of the adapter's output, which it learns.
* ``"mean"``: the source's tables as they are (a tied source stays tied unless ``untie``); every
  new row is the mean row plus small noise. A plain ``model.llm(ids)`` then is the source LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import OmniConfig
from ..errors import CheckpointError
from ..models.omni import OmniModel
from ..tokens import ANSWER_T, ASR, EOT, INPUT_T, NUM_STREAMS, PADDED_TEXT_VOCAB_SIZE, TEXT_VOCAB_SIZE, VOCAB_SIZE

ROWS = ("prompt", "mean")


@dataclass
class SourceLM:
    """A causal LM read into this package's tensor names (``llm.*``), text vocabulary only."""

    config: dict[str, Any]  # OmniConfig keys (no vocabulary keys)
    state: dict[str, torch.Tensor]  # llm.embed.weight (V, C), llm.layers.*, llm.final_norm.weight, llm.lm_head.weight?
    vocab_size: int  # rows of its embedding table
    tied: bool
    tokenizer_json: str | None

# Each prompt special starts as the first of these texts that the source's tokenizer reads as one token.
SEEDS: dict[int, tuple[str, ...]] = {
    INPUT_T: ("<|im_start|>", "<|start_header_id|>", "<s>"),
    EOT: ("<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>"),
    ANSWER_T: ("\n",),
    ASR: (" transcript", ":"),
}


def seed_ids(tokenizer_json: str | None, vocab_size: int) -> dict[int, int]:
    """{special id: source token id} for the prompt specials the tokenizer has as single tokens."""
    if tokenizer_json is None:
        return {}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    found: dict[int, int] = {}
    for special, texts in SEEDS.items():
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            if len(ids) == 1 and ids[0] < vocab_size:
                found[special] = ids[0]
                break
    return found


def _noise_rows(table: torch.Tensor, count: int, generator: torch.Generator, noise: float) -> torch.Tensor:
    """``count`` new rows: the table's mean row plus Gaussian noise of ``noise`` times its standard deviation."""
    mean = table.mean(0, keepdim=True)
    return mean + noise * table.std().item() * torch.randn(count, table.shape[1], generator=generator)


def _mean_tables(embed: torch.Tensor, head: torch.Tensor | None, generator: torch.Generator, noise: float
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    new_embed = torch.cat((embed, _noise_rows(embed, VOCAB_SIZE - embed.shape[0], generator, noise)))
    if head is None:
        return new_embed, None
    return new_embed, torch.cat((head, _noise_rows(head, VOCAB_SIZE - head.shape[0], generator, noise)))


def _prompt_tables(embed: torch.Tensor, head: torch.Tensor, seeds: dict[int, int], generator: torch.Generator,
                   noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    vocab, width = embed.shape
    new_embed = torch.zeros(VOCAB_SIZE, width)
    new_embed[:vocab] = embed
    for special in SEEDS:
        new_embed[special] = embed[seeds[special]] if special in seeds else _noise_rows(embed, 1, generator, noise)[0]
    new_embed *= NUM_STREAMS
    audio_rows = _noise_rows(head, VOCAB_SIZE - PADDED_TEXT_VOCAB_SIZE, generator, noise)
    new_head = torch.cat((head, torch.zeros(PADDED_TEXT_VOCAB_SIZE - vocab, width), audio_rows))
    if EOT in seeds:  # the source's end of turn moves to _eot (a tie would go to the lower, source id)
        new_head[EOT] = head[seeds[EOT]]
        new_head[seeds[EOT]] = 0
    return new_embed, new_head


def grow_to_omni(source: SourceLM, whisper_dim: int, seed: int = 0, noise: float = 0.02, untie: bool = False,
                 rows: str = "prompt", tokenizer_json: str | None = None
                 ) -> tuple[OmniConfig, dict[str, torch.Tensor]]:
    """The source LM grown to the 181,120-row layout plus a fresh audio adapter (OmniModel names).

    Text ids 0..V-1 are the source's; the other rows are filled as ``rows`` says (the module's
    docstring). ``tokenizer_json`` (default: the source's) names the prompt specials' seeds.
    """
    from ..models.llm import SwiGLU

    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    if source.vocab_size > TEXT_VOCAB_SIZE:
        raise CheckpointError(
            f"the source LM has {source.vocab_size} text tokens; the Mini-Omni layout holds at most "
            f"{TEXT_VOCAB_SIZE} (ids from {TEXT_VOCAB_SIZE} on are the text specials _eot, _pad_t, …)"
        )
    generator = torch.Generator().manual_seed(seed)
    embed = source.state["llm.embed.weight"].float()
    head = embed if source.tied else source.state["llm.lm_head.weight"].float()
    if rows == "prompt":
        seeds = seed_ids(tokenizer_json or source.tokenizer_json, source.vocab_size)
        new_embed, new_head = _prompt_tables(embed, head, seeds, generator, noise)
        tied = False
    else:
        tied = source.tied and not untie
        new_embed, new_head = _mean_tables(embed, None if tied else head, generator, noise)
    config = OmniConfig(**source.config, whisper_adapter_dim=whisper_dim, tie_word_embeddings=tied)
    state = {k: v.float() for k, v in source.state.items() if k not in ("llm.embed.weight", "llm.lm_head.weight")}
    state["llm.embed.weight"] = new_embed
    if new_head is not None:
        state["llm.lm_head.weight"] = new_head
    torch.manual_seed(seed)
    adapter = SwiGLU(whisper_dim, config.intermediate_size, config.n_embd, bias=False)
    for name, tensor in adapter.state_dict().items():
        state[f"adapter.{name}"] = tensor
    return config, state


def grown_model(source: SourceLM, whisper_dim: int, rows: str = "prompt") -> OmniModel:
    """The source LM grown (:func:`grow_to_omni`) as an :class:`OmniModel` in memory, float32, eval mode."""
    config, state = grow_to_omni(source, whisper_dim=whisper_dim, rows=rows)
    with torch.device("meta"):
        model = OmniModel(config)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.embed.weight
    model.llm.init_rope()
    return model.eval()
