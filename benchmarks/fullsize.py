"""The published Mini-Omni shapes with random weights, for speed and memory figures (never quality).

Shared by the benchmarks: a model in memory (:func:`build`) or a checkpoint directory in the
published layout (:func:`write_checkpoint`: model_config.yaml, lit_model.pth in float32,
tokenizer.json, small.pt, snac/). The head rows of the audio special ids (``_eoa``, pads)
are zeroed so that every decode step yields a speech frame, as a real answer's steps do
until it ends; answers are then bounded by ``max_new_tokens`` or ``max_output_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

SNAC_24KHZ = {
    "sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8], "decoder_dim": 1024,
    "decoder_rates": [8, 8, 4, 2], "attn_window_size": None, "codebook_size": 4096, "codebook_dim": 8,
    "vq_strides": [4, 2, 1], "noise": True, "depthwise": True,
}
WHISPER_SMALL = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=768, n_audio_head=12, n_audio_layer=12)


def speech_like(seconds: float, sample_rate: int = 16000) -> np.ndarray:
    """A voiced, pitch-varying tone: enough to exercise the encoder (not recognised as speech by a VAD)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voice = sum(np.sin(k * 2 * np.pi * np.cumsum(pitch) / sample_rate) / k for k in range(1, 6))
    return (0.2 * voice * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)).astype(np.float32)


def random_model(dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):  # -> OmniModel
    """A full-size OmniModel with random weights and no audio special ids in its head."""
    from miniomni.config import OmniConfig
    from miniomni.models.omni import OmniModel

    torch.manual_seed(seed)
    config = OmniConfig()
    with torch.device("meta"):
        model = OmniModel(config)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
        for layer in range(7):
            start = config.text_vocab_size + layer * config.audio_vocab_size
            model.llm.lm_head.weight[start + 4096 : start + config.audio_vocab_size] = 0
    model.llm.init_rope(device)
    return model.eval().requires_grad_(False)


def tiny_tokenizer():  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["hello world"], trainer=trainers.BpeTrainer(vocab_size=300))
    return tokenizer


def build(dtype: str = "float32", quantize: str | None = None, device: str = "cpu", encoder_context: str = "30"):
    """A ready MiniOmni (-> miniomni.pipeline.MiniOmni) at full size, built in memory.

    ``encoder_context``: how much audio Whisper attends over (miniomni.audio.ENCODER_CONTEXTS).
    """
    from snac import SNAC

    from miniomni.codec import Codec
    from miniomni.models.whisper import WhisperDims, WhisperEncoder
    from miniomni.pipeline import MiniOmni
    from miniomni.quantize import quantize_int8

    torch_dtype = getattr(torch, dtype)
    model = random_model(torch_dtype, device)
    if quantize == "int8":
        quantize_int8(model.llm)
    encoder = WhisperEncoder(WhisperDims(**WHISPER_SMALL)).to(device).eval().requires_grad_(False)
    codec = Codec(SNAC(**SNAC_24KHZ), device)
    return MiniOmni(model, encoder, codec, tiny_tokenizer(), torch.device(device), torch_dtype,
                    encoder_context=encoder_context)


def write_checkpoint(directory: Path) -> Path:
    """The published layout at full size in ``directory`` (kept when it is already complete)."""
    from snac import SNAC

    from miniomni.checkpoints import state_dict_to_litgpt
    from miniomni.config import OmniConfig
    from miniomni.models.whisper import WhisperDims, WhisperEncoder

    directory = Path(directory)
    done = directory / ".complete"
    if done.is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = OmniConfig()
    model = random_model()
    torch.save(state_dict_to_litgpt(model.state_dict(), config), directory / "lit_model.pth")
    del model
    config.to_yaml(directory / "model_config.yaml")
    dims = WhisperDims(**WHISPER_SMALL)
    encoder = WhisperEncoder(dims)
    torch.save({"dims": asdict(dims), "model_state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}},
               directory / "small.pt")
    (directory / "snac").mkdir(exist_ok=True)
    (directory / "snac" / "config.json").write_text(json.dumps(SNAC_24KHZ))
    torch.save(SNAC(**SNAC_24KHZ).state_dict(), directory / "snac" / "pytorch_model.bin")
    (directory / "tokenizer.json").write_text(tiny_tokenizer().to_str())
    done.write_text("")
    return directory
