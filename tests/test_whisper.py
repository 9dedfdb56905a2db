"""Tests for miniomni.models.whisper against a tiny random openai-whisper model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_whisper

from miniomni.audio import log_mel_spectrogram
from miniomni.checkpoints import load_whisper_encoder
from miniomni.errors import CheckpointError
from miniomni.models.whisper import (
    WhisperDims,
    WhisperEncoder,
    encoder_state_dict_from_whisper,
    sinusoids,
)

whisper = pytest.importorskip("whisper")
from whisper.model import Whisper  # noqa: E402

TINY = dict(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=64,
    n_audio_head=4,
    n_audio_layer=2,
    n_vocab=100,
    n_text_ctx=16,
    n_text_state=64,
    n_text_head=4,
    n_text_layer=1,
)


class Payload:
    """A custom class: pickling an instance of it must be refused by the loader."""

    def __init__(self) -> None:
        self.value = 42


@pytest.fixture(scope="module")
def reference() -> Whisper:
    return random_whisper(TINY, seed=1234)


@pytest.fixture(scope="module")
def ckpt_path(reference: Whisper, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    torch.save({"dims": asdict(reference.dims), "model_state_dict": reference.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def mel() -> torch.Tensor:
    sr = 16000
    t = np.arange(int(2.5 * sr)) / sr
    rng = np.random.default_rng(7)
    x = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    return log_mel_spectrogram(x).unsqueeze(0)


def test_state_dict_keys_match_whisper_encoder(reference: Whisper) -> None:
    ours = WhisperEncoder(WhisperDims.from_dict(TINY))
    theirs = reference.encoder.state_dict()
    assert set(ours.state_dict()) == set(theirs)
    for k, v in ours.state_dict().items():
        assert v.shape == theirs[k].shape, k
    assert torch.allclose(ours.positional_embedding, theirs["positional_embedding"])
    strict = {k[len("encoder."):]: v for k, v in reference.state_dict().items() if k.startswith("encoder.")}
    ours.load_state_dict(strict, strict=True)


def test_encoder_matches_whisper(reference: Whisper, ckpt_path: str, mel: torch.Tensor) -> None:
    encoder = load_whisper_encoder(ckpt_path)
    assert encoder.dims == WhisperDims.from_dict(TINY)
    with torch.no_grad():
        ours = encoder(mel)
        ref = reference.embed_audio(mel)
    assert ours.shape == (1, 1500, 64) and ours.dtype == torch.float32
    diff = float((ours - ref).abs().max())
    print(f"encoder float32 max abs diff vs whisper: {diff:.3g}")
    assert diff <= 1e-4


def test_from_state_dict_and_helper(reference: Whisper, mel: torch.Tensor) -> None:
    ckpt = {"dims": {**asdict(reference.dims), "extra_key": 1}, "model_state_dict": reference.state_dict()}
    dims, state = encoder_state_dict_from_whisper(ckpt)
    assert "conv1.weight" in state and "blocks.0.attn.query.weight" in state and "positional_embedding" in state
    encoder = WhisperEncoder.from_state_dict(dims, state)
    prefixed = WhisperEncoder.from_state_dict(dims, reference.state_dict())
    with torch.no_grad():
        assert torch.equal(encoder(mel), prefixed(mel))


def test_fp16_checkpoint_loads_as_float32(reference: Whisper, tmp_path, mel: torch.Tensor) -> None:
    # The official checkpoints store float16 tensors.
    half_state = {k: v.half() for k, v in reference.state_dict().items()}
    path = tmp_path / "small.pt"
    torch.save({"dims": asdict(reference.dims), "model_state_dict": half_state}, path)
    encoder = load_whisper_encoder(path)
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    assert encoder.positional_embedding.dtype == torch.float32
    with torch.no_grad():
        diff = float((encoder(mel) - reference.embed_audio(mel)).abs().max())
    assert diff < 0.05


def test_bf16_autocast_close(ckpt_path: str, mel: torch.Tensor) -> None:
    encoder = load_whisper_encoder(ckpt_path)
    with torch.no_grad():
        ref = encoder(mel)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = encoder(mel)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    diff = float((low.float() - ref).abs().max())
    print(f"encoder bf16 autocast max abs diff vs float32: {diff:.3g}")
    assert diff < 0.25
    cos = torch.nn.functional.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.999


def test_bf16_cast_module(ckpt_path: str, mel: torch.Tensor) -> None:
    encoder = load_whisper_encoder(ckpt_path, dtype=torch.bfloat16)
    assert encoder.conv1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = encoder(mel)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_wrong_mel_shape(ckpt_path: str, mel: torch.Tensor) -> None:
    encoder = load_whisper_encoder(ckpt_path)
    with pytest.raises(ValueError, match="3000 mel frames"):
        encoder(mel[..., :1000])
    with pytest.raises(ValueError, match="unsqueeze"):
        encoder(mel[0])


def test_missing_file(tmp_path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_whisper_encoder(tmp_path / "small.pt")
    msg = str(info.value)
    assert "small.pt" in msg and "not found" in msg and "miniomni download DIR" in msg


def test_truncated_file(ckpt_path: str, tmp_path) -> None:
    data = Path(ckpt_path).read_bytes()
    half = tmp_path / "small.pt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_whisper_encoder(half)
    msg = str(info.value)
    assert "half-written download" in msg and "Delete it" in msg and str(half) in msg
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="half-written"):
        load_whisper_encoder(empty)
    html = tmp_path / "html.pt"
    html.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_whisper_encoder(html)


def test_pickled_objects_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"dims": TINY, "model_state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        load_whisper_encoder(path)
    msg = str(info.value)
    assert "pickled Python objects" in msg and "refused for safety" in msg and "evil.pt" in msg


def test_missing_keys_and_tensors(reference: Whisper, tmp_path) -> None:
    path = tmp_path / "nodims.pt"
    torch.save({"model_state_dict": reference.state_dict()}, path)
    with pytest.raises(CheckpointError, match="'dims'"):
        load_whisper_encoder(path)

    state = dict(reference.state_dict())
    del state["encoder.blocks.1.mlp.0.weight"]
    path = tmp_path / "partial.pt"
    torch.save({"dims": TINY, "model_state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"missing 1 encoder tensors \(e\.g\. blocks\.1\.mlp\.0\.weight\)"):
        load_whisper_encoder(path)

    wrong_dims = {**TINY, "n_audio_state": 32, "n_audio_head": 2}
    path = tmp_path / "wrong.pt"
    torch.save({"dims": wrong_dims, "model_state_dict": reference.state_dict()}, path)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_whisper_encoder(path)


def test_dims_from_dict() -> None:
    dims = WhisperDims.from_dict({**TINY, "unknown": 3})
    assert dims.n_audio_state == 64 and dims.n_text_layer == 1
    audio_only = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")
    assert WhisperDims.from_dict({k: TINY[k] for k in audio_only}).n_vocab is None
    with pytest.raises(CheckpointError, match="n_audio_layer"):
        WhisperDims.from_dict({k: v for k, v in TINY.items() if k != "n_audio_layer"})


def test_sinusoids_formula() -> None:
    table = sinusoids(10, 8)
    inc = np.log(10000) / 3
    inv = np.exp(-inc * np.arange(4))
    scaled = np.arange(10)[:, None] * inv[None, :]
    np.testing.assert_allclose(table.numpy(), np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1), atol=1e-6)
