"""Checkpoint formats: the published layout, the safetensors bundle, safe loading, clear errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import miniomni
from miniomni import checkpoints
from miniomni.config import OmniConfig
from miniomni.errors import CheckpointError, ConfigError
from miniomni.precision import machine

PUBLISHED_FILES = ["model_config.yaml", "lit_model.pth", "tokenizer.json", "small.pt",
                   "snac/config.json", "snac/pytorch_model.bin"]


def linked_copy(source: Path, target: Path, skip: str | None = None) -> Path:
    """A checkpoint directory of symlinks to ``source``'s files, without ``skip``."""
    for name in PUBLISHED_FILES:
        if name == skip:
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source / name, target / name)
    return target


@pytest.mark.parametrize("missing", PUBLISHED_FILES)
def test_missing_file_is_named_with_the_fix(checkpoint_dir, tmp_path, missing, monkeypatch):
    monkeypatch.setattr(checkpoints, "OPENAI_WHISPER_CACHE", tmp_path / "no-cache" / "small.pt")
    directory = linked_copy(checkpoint_dir, tmp_path / "ckpt", skip=missing)
    with pytest.raises(CheckpointError) as info:
        checkpoints.read_checkpoint_dir(directory)
    message = str(info.value)
    assert Path(missing).name in message and "miniomni download" in message


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*miniomni download"):
        miniomni.load(tmp_path / "nowhere", device="cpu")


class NotATensor:
    pass


def test_pickled_objects_are_refused(checkpoint_dir, tmp_path):
    directory = linked_copy(checkpoint_dir, tmp_path / "ckpt", skip="lit_model.pth")
    torch.save({"transformer.wte.weight": NotATensor()}, directory / "lit_model.pth")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        checkpoints.read_checkpoint_dir(directory)


def test_half_written_weights_are_reported(checkpoint_dir, tmp_path):
    directory = linked_copy(checkpoint_dir, tmp_path / "ckpt", skip="lit_model.pth")
    data = (checkpoint_dir / "lit_model.pth").read_bytes()
    (directory / "lit_model.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="half-written"):
        checkpoints.read_checkpoint_dir(directory)


def test_config_that_does_not_fit_the_weights(checkpoint_dir, tmp_path):
    directory = linked_copy(checkpoint_dir, tmp_path / "ckpt", skip="model_config.yaml")
    config = yaml.safe_load((checkpoint_dir / "model_config.yaml").read_text())
    config["n_embd"] = 48
    config["head_size"] = 12
    (directory / "model_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="does not fit"):
        miniomni.load(directory, device="cpu")


def test_litgpt_config_keys_and_unsupported_options():
    litgpt_style = {
        "name": "Qwen2-0.5B", "hf_config": {"name": "Qwen2-0.5B", "org": "Qwen"}, "block_size": 2048,
        "vocab_size": 50254, "padding_multiple": 512, "padded_vocab_size": 181120, "n_layer": 24,
        "n_head": 14, "head_size": 64, "n_embd": 896, "rotary_percentage": 1, "parallel_residual": False,
        "bias": False, "lm_head_bias": False, "n_query_groups": 2, "shared_attention_norm": False,
        "norm_class_name": "RMSNorm", "norm_eps": 1e-06, "mlp_class_name": "LLaMAMLP",
        "intermediate_size": 4864, "rope_base": 1000000, "add_qkv_bias": True, "post_adapter": False,
        "text_vocab_size": 152000, "cat_audio_vocab_size": 29120, "audio_vocab_size": 4160,
        "whisper_adapter_dim": 768, "asr_adapter": "llamamlp", "tie_word_embeddings": False,
    }
    config = OmniConfig.from_dict(litgpt_style)
    assert config == OmniConfig()
    assert OmniConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="parallel_residual"):
        OmniConfig.from_dict({**litgpt_style, "parallel_residual": True})
    with pytest.raises(ConfigError, match="padded_vocab_size"):
        OmniConfig.from_dict({**litgpt_style, "padded_vocab_size": 151936})


def test_bundle_round_trip_gives_identical_tokens(omni, checkpoint_dir, tmp_path, question_wav):
    bundle = checkpoints.write_bundle(checkpoints.read_checkpoint_dir(checkpoint_dir), tmp_path / "tiny.safetensors")
    assert not (tmp_path / "tiny.safetensors.partial").exists()
    loaded = miniomni.load(bundle, device="cpu")
    for key, tensor in omni.model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[key]), key
    a = omni.generate(audio=question_wav, max_new_tokens=12)
    b = loaded.generate(audio=question_wav, max_new_tokens=12)
    assert a.tokens_json() == b.tokens_json()
    assert (a.audio == b.audio).all()


def test_truncated_or_foreign_bundle(omni, checkpoint_dir, tmp_path):
    bundle = checkpoints.write_bundle(checkpoints.read_checkpoint_dir(checkpoint_dir), tmp_path / "b.safetensors")
    data = bundle.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="incomplete"):
        miniomni.load(broken, device="cpu")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a miniomni bundle"):
        miniomni.load(foreign, device="cpu")


def test_download_offline_gives_a_clear_message(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as info:
        checkpoints.download(tmp_path / "ckpt")
    message = str(info.value)
    assert "gpt-omni/mini-omni" in message and "offline" in message
    assert "hubertsiuzdak/snac_24khz" in message and "small.pt" in message


def test_unknown_hub_id_is_refused():
    with pytest.raises(CheckpointError, match="neither a local path"):
        checkpoints.read_checkpoint("someone/some-model")


def test_download_skips_files_already_present(checkpoint_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, directory)
    assert checkpoints.download(directory) == directory


def test_download_fails_fast_when_the_hub_host_does_not_resolve(tmp_path, monkeypatch):
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(CheckpointError, match="looks offline") as info:
        checkpoints.download(tmp_path / "ckpt")
    assert "lit_model.pth" in str(info.value)


def test_int8_and_bfloat16_bundles(checkpoint_dir, tmp_path, question_wav):
    parts = checkpoints.read_checkpoint_dir(checkpoint_dir)
    int8_path = checkpoints.write_bundle(parts, tmp_path / "int8.safetensors", quantize="int8")
    bf16_path = checkpoints.write_bundle(parts, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    full_size = checkpoints.write_bundle(parts, tmp_path / "full.safetensors").stat().st_size
    assert bf16_path.stat().st_size < full_size and int8_path.stat().st_size < bf16_path.stat().st_size
    from_bundle = miniomni.load(int8_path, device="cpu")  # quantized without being asked
    from_dir = miniomni.load(checkpoint_dir, device="cpu", quantize="int8")
    assert from_bundle.dtype == (torch.bfloat16 if machine().native_bfloat16 else torch.float32)  # the plan's choice
    assert type(from_bundle.model.llm.lm_head).__name__ == "Int8Linear"
    a = from_bundle.generate(audio=question_wav, max_new_tokens=10)
    b = from_dir.generate(audio=question_wav, max_new_tokens=10)
    assert a.tokens_json() == b.tokens_json()
    assert miniomni.load(bf16_path, device="cpu", dtype="bfloat16").generate(text="Hi", task="T1T2", max_new_tokens=3)
    with pytest.raises(CheckpointError, match="already quantized"):
        checkpoints.write_bundle(checkpoints.read_bundle(int8_path), tmp_path / "again.safetensors",
                                 dtype=torch.float32)


@pytest.mark.parametrize("name, content, words", [
    ("tokenizer.json", '{"version": "1.0", "model": {"type": "BPE", "vo', "tokenizer.json"),
    ("snac/config.json", '{"sampling_rate": 24000, "no_such_option": 1}', "SNAC"),
])
def test_broken_tokenizer_or_codec_config_is_a_checkpoint_error(checkpoint_dir, tmp_path, name, content, words):
    directory = linked_copy(checkpoint_dir, tmp_path / "ckpt", skip=name)
    (directory / name).write_text(content)
    with pytest.raises(CheckpointError, match=words):
        miniomni.load(directory, device="cpu")
