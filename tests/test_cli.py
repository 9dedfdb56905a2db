"""The `miniomni` command line on the tiny checkpoint: every task, files written, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from conftest import speech_like

from miniomni.cli import main
from miniomni.tokens import EOA, EOT


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("task", ["A1A2-batch", "A1A2", "A1T2", "asr", "T1A2", "T1T2"])
def test_generate_every_task_writes_tokens_and_audio(capsys, checkpoint_dir, question_wav, tmp_path, task):
    spoken = task in ("A1A2-batch", "A1A2", "A1T2", "asr")
    source = ["--audio", str(question_wav)] if spoken else ["--text", "What is your name?"]
    out, tokens_out = tmp_path / "answer.wav", tmp_path / "tokens.json"
    code, stdout, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--task", task, *source,
                               "--out", str(out), "--tokens-out", str(tokens_out), "--max-new-tokens", "14",
                               "--device", "cpu")
    assert code == 0, stderr
    data = json.loads(tokens_out.read_text())
    assert set(data) == {"task", "prompt_length", "text", "audio"}
    assert data["task"] == task
    assert 1 <= len(data["text"]) <= 14
    assert all(isinstance(t, int) and 0 <= t < 152000 for t in data["text"])
    if task.startswith("A1"):
        assert data["prompt_length"] == 76 + 3  # 1.5 s -> int(1500 / 20) + 1 Whisper frames
    if task in ("A1A2-batch", "A1A2", "T1A2"):
        assert len(data["audio"]) == 7 and all(len(layer) == len(data["text"]) for layer in data["audio"])
        assert all(0 <= t < 4160 for layer in data["audio"] for t in layer)
        audio, rate = sf.read(out, dtype="int16")
        assert rate == 24000 and sf.info(out).subtype == "PCM_16"
        assert len(audio) % 2048 == 0
        stop = data["audio"][6][-1] == EOA
        assert stop or len(data["text"]) == 14
    else:
        assert data["audio"] == [] and not out.exists()
        assert EOT not in data["text"][1:-1]


def test_stereo_44k_input_is_converted(capsys, checkpoint_dir, tmp_path):
    wav = tmp_path / "stereo.wav"
    mono = speech_like(2.0, sample_rate=44100)
    sf.write(wav, np.stack([mono, 0.5 * mono], axis=1), 44100)
    tokens_out = tmp_path / "t.json"
    code, _, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--task", "asr",
                          "--audio", str(wav), "--tokens-out", str(tokens_out), "--max-new-tokens", "3")
    assert code == 0, stderr
    assert json.loads(tokens_out.read_text())["prompt_length"] == 101 + 3


def test_long_input_is_cut_with_a_warning(capsys, checkpoint_dir, tmp_path, caplog):
    wav = tmp_path / "long.wav"
    sf.write(wav, speech_like(31.0), 16000)
    tokens_out = tmp_path / "t.json"
    code, _, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--task", "A1T2",
                          "--audio", str(wav), "--tokens-out", str(tokens_out), "--max-new-tokens", "2")
    assert code == 0, stderr
    assert json.loads(tokens_out.read_text())["prompt_length"] == 1500 + 3
    assert "cut" in caplog.text.lower()


@pytest.mark.parametrize(
    "content, expected",
    [(b"", "empty"), (b"this is not audio at all" * 10, "could not"), (None, "empty")],
)
def test_bad_audio_is_a_clear_error(capsys, checkpoint_dir, tmp_path, content, expected):
    wav = tmp_path / "bad.wav"
    if content is None:
        sf.write(wav, np.zeros(0, dtype=np.float32), 16000)
    else:
        wav.write_bytes(content)
    code, _, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--audio", str(wav))
    assert code == 2
    assert stderr.startswith("error:") and expected in stderr.lower() and "Traceback" not in stderr


def test_missing_checkpoint_and_missing_audio(capsys, tmp_path, checkpoint_dir):
    code, _, stderr = run(capsys, "generate", "--checkpoint", str(tmp_path / "none"), "--text", "hi")
    assert code == 2 and "miniomni download" in stderr
    code, _, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--audio", str(tmp_path / "no.wav"))
    assert code == 2 and "no.wav" in stderr
    code, _, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--task", "asr", "--text", "hi")
    assert code == 2 and "audio input" in stderr


def test_bad_sampling_options_are_errors(capsys, checkpoint_dir):
    code, _, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--text", "hi",
                          "--temperature", "0.5", "--top-p", "0")
    assert code == 2 and "top_p" in stderr


def test_convert_then_generate_from_the_bundle(capsys, checkpoint_dir, tmp_path):
    bundle = tmp_path / "tiny.safetensors"
    code, stdout, stderr = run(capsys, "convert", str(checkpoint_dir), str(bundle))
    assert code == 0, stderr and bundle.is_file()
    outputs = []
    for source in (checkpoint_dir, bundle):
        tokens_out = tmp_path / f"{source.name}.json"
        code, stdout, stderr = run(capsys, "generate", "--checkpoint", str(source), "--task", "T1T2",
                                   "--text", "How are you?", "--tokens-out", str(tokens_out), "--max-new-tokens", "8")
        assert code == 0, stderr
        outputs.append(json.loads(tokens_out.read_text()))
    assert outputs[0] == outputs[1]


def test_bfloat16_runs(capsys, checkpoint_dir, question_wav, tmp_path):
    tokens_out = tmp_path / "t.json"
    code, _, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--audio", str(question_wav),
                          "--dtype", "bfloat16", "--max-new-tokens", "10", "--tokens-out", str(tokens_out),
                          "--out", str(tmp_path / "a.wav"))
    assert code == 0, stderr
    assert len(json.loads(tokens_out.read_text())["text"]) <= 10


def test_stream_writes_the_same_tokens_and_a_full_wav(capsys, checkpoint_dir, question_wav, tmp_path):
    outputs = {}
    for mode in ("offline", "stream"):
        out, tokens_out = tmp_path / f"{mode}.wav", tmp_path / f"{mode}.json"
        extra = ["--stream"] if mode == "stream" else []
        code, stdout, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir),
                                   "--audio", str(question_wav), "--max-new-tokens", "20", "--out", str(out),
                                   "--tokens-out", str(tokens_out), *extra)
        assert code == 0, stderr
        outputs[mode] = (json.loads(tokens_out.read_text()), sf.read(out, dtype="int16")[0], stdout.strip())
    assert outputs["offline"][0] == outputs["stream"][0]
    assert len(outputs["offline"][1]) == len(outputs["stream"][1]) == (20 - 7) * 2048
    assert outputs["offline"][2] == outputs["stream"][2] != ""


@pytest.mark.slow
def test_out_dash_writes_raw_pcm_to_stdout(checkpoint_dir, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "miniomni.cli", "-q", "generate", "--checkpoint", str(checkpoint_dir),
           "--text", "What is your name?", "--max-new-tokens", "12", "--stream", "--out", "-"]
    proc = subprocess.run(cmd, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout) == (12 - 7) * 2048 * 2  # 16-bit mono samples, no header
    assert not proc.stdout.startswith(b"RIFF")
    assert proc.stderr.decode().strip() != ""  # the text went to stderr


def test_quantized_fast_cli(capsys, checkpoint_dir, question_wav, tmp_path):
    tokens_out = tmp_path / "t.json"
    code, stdout, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--audio", str(question_wav),
                               "--quantize", "int8", "--fast-encoder", "--stream", "--max-new-tokens", "10",
                               "--out", str(tmp_path / "a.wav"), "--tokens-out", str(tokens_out))
    assert code == 0, stderr
    assert len(json.loads(tokens_out.read_text())["text"]) == 10


def test_unwritable_outputs_fail_before_the_work(capsys, checkpoint_dir, question_wav, tmp_path, monkeypatch):
    import miniomni.pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded when the outputs cannot be written")

    monkeypatch.setattr(miniomni.pipeline, "load", no_load)
    code, _, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--audio", str(question_wav),
                          "--out", str(tmp_path / "missing" / "a.wav"))
    assert code == 2 and "does not exist" in stderr
    code, _, stderr = run(capsys, "generate", "--checkpoint", str(checkpoint_dir), "--text", "hi",
                          "--tokens-out", str(tmp_path))
    assert code == 2 and "directory" in stderr


def test_serve_flags_become_the_server_settings():
    from miniomni.cli import build_parser
    from miniomni.server.settings import settings_from_args

    args = build_parser().parse_args(["serve", "--checkpoint", "ckpt", "--webrtc-playout-ms", "0",
                                      "--max-connections", "7", "--no-speculation", "--max-message-mb", "1"])
    settings = settings_from_args(args, "key", None)
    assert settings.webrtc_playout == 0 and settings.max_connections == 7 and not settings.speculate
    assert settings.max_message_bytes == 1024 * 1024 and settings.api_key == "key"
    default = settings_from_args(build_parser().parse_args(["serve", "--checkpoint", "ckpt"]), None, None)
    assert default.webrtc_playout == 0.2 and default.speculate


def test_install_hints_name_this_distribution():
    """The install hints name the distribution pyproject.toml builds ("miniomni" on PyPI is another package)."""
    import re
    from pathlib import Path

    from miniomni.errors import DISTRIBUTION, install_hint

    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert re.search(r'^name = "([^"]+)"', pyproject, re.MULTILINE).group(1) == DISTRIBUTION != "miniomni"
    assert install_hint("server") == ("pip install 'miniomni-speech[server]' "
                                      "(in a clone of the repository: pip install -e '.[server]')")
