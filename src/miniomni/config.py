"""Model configuration: backbone dimensions and vocabulary layout, read from litgpt-style YAML."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .tokens import NUM_AUDIO_LAYERS, PADDED_AUDIO_VOCAB_SIZE, PADDED_TEXT_VOCAB_SIZE

log = logging.getLogger(__name__)

# litgpt keys we accept but that only describe what we always do, or that name
# training-time options without effect at inference.
_IGNORED_KEYS = {
    "name", "hf_config", "vocab_size", "padding_multiple", "attn_dropout", "force_align",
    "use_pretrain_phoneme_emb", "prompt_vocab_size", "pos_type", "gelu_approximate",
    "n_expert", "n_expert_per_token", "rope_condense_ratio", "shared_attention_norm",
    "cat_audio_vocab_size", "post_adapter_layers", "lm_head_bias", "rope_adjustments",
    "sliding_window_size", "sliding_window_layer_placing",
}


@dataclass
class OmniConfig:
    """Dimensions of the decoder, the audio adapter and the 8-stream vocabulary.

    Defaults are the published Mini-Omni (Qwen2-0.5B backbone).
    """

    n_layer: int = 24
    n_head: int = 14
    n_query_groups: int = 2
    head_size: int = 64
    n_embd: int = 896
    intermediate_size: int = 4864
    padded_vocab_size: int = PADDED_TEXT_VOCAB_SIZE + NUM_AUDIO_LAYERS * PADDED_AUDIO_VOCAB_SIZE
    text_vocab_size: int = PADDED_TEXT_VOCAB_SIZE
    audio_vocab_size: int = PADDED_AUDIO_VOCAB_SIZE
    whisper_adapter_dim: int = 768
    add_qkv_bias: bool = True
    bias: bool = False
    rope_base: float = 1_000_000.0
    rotary_percentage: float = 1.0
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    block_size: int = 2048

    def __post_init__(self) -> None:
        if self.n_head % self.n_query_groups:
            raise ConfigError(
                f"n_head ({self.n_head}) must be a multiple of n_query_groups ({self.n_query_groups})"
            )
        expected = self.text_vocab_size + NUM_AUDIO_LAYERS * self.audio_vocab_size
        if self.padded_vocab_size != expected:
            raise ConfigError(
                f"padded_vocab_size {self.padded_vocab_size} does not match the 8-stream layout "
                f"text_vocab_size + 7 * audio_vocab_size = {expected}"
            )
        if self.text_vocab_size != PADDED_TEXT_VOCAB_SIZE or self.audio_vocab_size != PADDED_AUDIO_VOCAB_SIZE:
            raise ConfigError(
                f"this implementation uses the published layout (text block {PADDED_TEXT_VOCAB_SIZE}, "
                f"audio blocks {PADDED_AUDIO_VOCAB_SIZE}); the config has {self.text_vocab_size} "
                f"and {self.audio_vocab_size}"
            )
        if self.rotary_percentage != 1.0:
            raise ConfigError("only rotary_percentage 1.0 (RoPE over the whole head) is supported")

    @property
    def q_per_kv(self) -> int:
        return self.n_head // self.n_query_groups

    @property
    def qkv_size(self) -> int:
        return (self.n_head + 2 * self.n_query_groups) * self.head_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmniConfig:
        """Build from litgpt-style keys; refuse options that change the architecture."""
        data = dict(data)
        unsupported = {
            "parallel_residual": False,
            "post_adapter": False,
            "scale_embeddings": False,
        }
        for key, wanted in unsupported.items():
            if key in data and bool(data.pop(key)) != wanted:
                raise ConfigError(f"model_config.yaml sets {key}, which Mini-Omni does not use and miniomni "
                                  "does not support")
        required = {"norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP", "asr_adapter": "llamamlp"}
        for key, wanted in required.items():
            if key in data and data[key] is not None and data.pop(key) != wanted:
                raise ConfigError(f"model_config.yaml: only {key}: {wanted} is supported")
            data.pop(key, None)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key in fields:
                kwargs[key] = value
            elif key not in _IGNORED_KEYS:
                log.debug("model_config: ignoring unknown key %s", key)
        if kwargs.get("n_query_groups") is None:
            kwargs["n_query_groups"] = kwargs.get("n_head", cls.n_head)
        if kwargs.get("head_size") is None:
            kwargs["head_size"] = kwargs.get("n_embd", cls.n_embd) // kwargs.get("n_head", cls.n_head)
        for key in ("rope_base", "norm_eps", "rotary_percentage"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> OmniConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML ({exc}); re-download it with `miniomni download`") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} does not hold a mapping of model settings")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """litgpt-compatible keys (loadable by the reference implementation too)."""
        data = dataclasses.asdict(self)
        data.update(
            norm_class_name="RMSNorm",
            mlp_class_name="LLaMAMLP",
            asr_adapter="llamamlp",
            parallel_residual=False,
            post_adapter=False,
            scale_embeddings=False,
            cat_audio_vocab_size=NUM_AUDIO_LAYERS * self.audio_vocab_size,
            lm_head_bias=False,
        )
        return data

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text
