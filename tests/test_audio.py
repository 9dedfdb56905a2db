"""Tests for miniomni.audio: loading, mel front end (vs openai-whisper), WAV output."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from miniomni import audio as A
from miniomni.errors import AudioError

whisper = pytest.importorskip("whisper")


def _whisper_mel_npz() -> np.lib.npyio.NpzFile:
    return np.load(os.path.join(os.path.dirname(whisper.__file__), "assets", "mel_filters.npz"))


def test_constants() -> None:
    assert A.N_SAMPLES == 480000 and A.N_FRAMES == 3000
    assert (A.WHISPER_SAMPLE_RATE, A.OUTPUT_SAMPLE_RATE) == (16000, 24000)
    assert (A.N_FFT, A.HOP_LENGTH, A.N_MELS, A.CHUNK_SECONDS) == (400, 160, 80, 30)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_whisper_assets(n_mels: int) -> None:
    ref = _whisper_mel_npz()[f"mel_{n_mels}"]
    ours = A.mel_filters(n_mels)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (n_mels, 201)
    diff = float(np.abs(ours.numpy() - ref).max())
    print(f"mel_{n_mels} filterbank max abs diff: {diff:.3g}")
    assert diff <= 1e-6


def _sine(seconds: float, freq: float = 440.0, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize(
    "name,signal",
    [
        ("noise_3.2s", (np.random.default_rng(0).standard_normal(51200) * 0.1).astype(np.float32)),
        ("sine_2s", _sine(2.0)),
        ("noise_31s", (np.random.default_rng(1).standard_normal(31 * 16000) * 0.3).astype(np.float32)),
    ],
)
def test_log_mel_matches_whisper(name: str, signal: np.ndarray) -> None:
    ref = whisper.log_mel_spectrogram(whisper.pad_or_trim(signal))
    ours = A.log_mel_spectrogram(signal)
    assert ours.shape == (80, 3000) and ours.dtype == torch.float32
    diff = float((ours - ref).abs().max())
    print(f"log-mel {name} max abs diff vs whisper: {diff:.3g}")
    assert diff <= 1e-4
    # Tensor input and an explicit device give the same result.
    assert torch.equal(A.log_mel_spectrogram(torch.from_numpy(signal), device="cpu"), ours)


def test_log_mel_without_padding_and_batch() -> None:
    x = _sine(1.0)
    short = A.log_mel_spectrogram(x, padding_to_30s=False)
    ref = whisper.log_mel_spectrogram(x)
    assert short.shape == (80, 100)
    assert float((short - ref).abs().max()) <= 1e-4
    batch = A.log_mel_spectrogram(torch.stack([torch.from_numpy(x), torch.zeros_like(torch.from_numpy(x))]))
    assert batch.shape == (2, 80, 3000)
    assert torch.allclose(batch[0], A.log_mel_spectrogram(x), atol=1e-5)


def _wav_bytes(x: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt)
    return buf.getvalue()


def test_load_audio_resamples_and_downmixes(tmp_path) -> None:
    sr = 44100
    n = int(1.5 * sr)
    t = np.arange(n) / sr
    stereo = np.stack([0.4 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 300 * t)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, sr, subtype="PCM_16")
    out = A.load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert out.shape[0] == 24000
    # Mean of the channels: amplitude 0.3 in the middle of the file.
    mid = out[4000:20000]
    assert abs(float(np.abs(mid).max()) - 0.3) < 0.01
    # str path and raw bytes give the same result.
    np.testing.assert_array_equal(A.load_audio(str(path)), out)
    np.testing.assert_array_equal(A.load_audio(path.read_bytes()), out)


def test_load_audio_arrays() -> None:
    x = _sine(1.0)
    np.testing.assert_array_equal(A.load_audio(x, sample_rate=16000), x)
    stereo_cn = np.stack([x, x])  # (channels, n)
    np.testing.assert_allclose(A.load_audio(stereo_cn, sample_rate=16000), x, atol=1e-7)
    np.testing.assert_allclose(A.load_audio(torch.from_numpy(stereo_cn.T.copy()), sample_rate=16000), x, atol=1e-7)
    up = A.load_audio(x, sample_rate=8000)
    assert up.shape == (32000,)
    pcm = (x * 32767).astype(np.int16)
    np.testing.assert_allclose(A.load_audio(pcm, sample_rate=16000), x, atol=1e-4)


def test_load_audio_flac_bytes() -> None:
    x = _sine(0.5, sr=22050)
    out = A.load_audio(_wav_bytes(x, 22050, "FLAC"))
    assert out.shape == (8000,)


def test_missing_file_names_it(tmp_path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="nope.wav") as info:
        A.load_audio(path)
    assert "does not exist" in str(info.value)


def test_corrupt_bytes(tmp_path) -> None:
    with pytest.raises(AudioError) as info:
        A.load_audio(b"this is definitely not audio data" * 10)
    msg = str(info.value)
    assert "could not be read" in msg and "WAV" in msg and "FLAC" in msg and "MP3" in msg
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(AudioError, match="could not be read"):
        A.load_audio(bad)


def test_empty_audio(tmp_path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty"):
        A.load_audio(path)
    with pytest.raises(AudioError, match="empty"):
        A.load_audio(np.zeros(0, dtype=np.float32), sample_rate=16000)
    with pytest.raises(AudioError, match="NaN"):
        A.load_audio(np.full(100, np.nan, dtype=np.float32), sample_rate=16000)
    with pytest.raises(AudioError, match="empty"):
        A.load_audio(b"")


def test_non_finite_samples() -> None:
    x = _sine(0.1)
    x[10] = np.inf
    x[20] = np.nan
    with pytest.raises(AudioError) as info:
        A.load_audio(x, sample_rate=16000)
    assert "non-finite" in str(info.value) and "2 " in str(info.value)


def test_bad_sample_rates() -> None:
    x = _sine(0.1)
    for rate in (0, -16000, 500000):
        with pytest.raises(AudioError, match="sample rate"):
            A.load_audio(x, sample_rate=rate)
    with pytest.raises(AudioError, match="sample_rate is required"):
        A.load_audio(x)
    with pytest.raises(AudioError, match="does not look like audio"):
        A.load_audio(np.zeros((20, 20), dtype=np.float32), sample_rate=16000)


def test_trim_to_30s_warns(caplog) -> None:
    x = np.zeros(35 * 16000, dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="miniomni.audio"):
        out, cut = A.trim_to_30s(x)
    assert cut and out.shape == (480000,)
    assert any("35.00 s" in r.getMessage() and "cut" in r.getMessage() for r in caplog.records)
    caplog.clear()
    short, cut = A.trim_to_30s(x[:16000])
    assert not cut and short.shape == (16000,)
    assert not caplog.records


@pytest.mark.parametrize(
    "n,expected",
    [(0, 1), (160, 1), (319, 1), (320, 2), (16000, 51), (48000, 151), (51200, 161), (480000, 1500), (640000, 1500)],
)
def test_whisper_frame_count(n: int, expected: int) -> None:
    assert A.whisper_frame_count(n) == expected


def test_write_wav_round_trip(tmp_path) -> None:
    x = np.concatenate([_sine(0.5, sr=24000), np.array([1.5, -2.0, 0.25], dtype=np.float32)])
    path = tmp_path / "out.wav"
    A.write_wav(path, x)
    info = sf.info(path)
    assert info.samplerate == 24000 and info.subtype == "PCM_16" and info.channels == 1
    back, sr = sf.read(path, dtype="int16")
    expected = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
    np.testing.assert_array_equal(back, expected)
    assert back[-3] == 32767 and back[-2] == -32767
    # File object and torch input.
    buf = io.BytesIO()
    A.write_wav(buf, torch.from_numpy(x))
    assert buf.getvalue() == path.read_bytes()


def test_float_to_pcm16() -> None:
    data = A.float_to_pcm16(np.array([0.0, 1.0, -1.0, 2.0, 0.5], dtype=np.float32))
    assert len(data) == 10
    np.testing.assert_array_equal(np.frombuffer(data, dtype="<i2"), [0, 32767, -32767, 32767, 16384])
