"""How much audio Whisper attends over: the frame counts, the pipeline's features, the flags."""

from __future__ import annotations

import pytest
import torch
from conftest import speech_like

from miniomni.audio import ENCODER_CONTEXTS, encoder_mel_frames, log_mel_spectrogram, whisper_frame_count
from miniomni.errors import MiniOmniError
from miniomni.pipeline import MiniOmni

SECOND = 16000


@pytest.mark.parametrize(("samples", "expected"), [
    (0, {"30": 3000, "10": 1000, "5": 500, "audio": 2}),
    (SECOND, {"30": 3000, "10": 1000, "5": 500, "audio": 102}),
    (5 * SECOND, {"30": 3000, "10": 1000, "5": 1000, "audio": 502}),  # 251 kept positions need 502 frames
    (10 * SECOND - 160, {"30": 3000, "10": 1000, "5": 1000, "audio": 1000}),
    (10 * SECOND, {"30": 3000, "10": 2000, "5": 1500, "audio": 1002}),  # exactly 10 s keeps 501 positions
    (29 * SECOND + 14400, {"30": 3000, "10": 3000, "5": 3000, "audio": 2992}),  # 29.9 s
    (30 * SECOND, {"30": 3000, "10": 3000, "5": 3000, "audio": 3000}),
    (45 * SECOND, {"30": 3000, "10": 3000, "5": 3000, "audio": 3000}),
])
def test_encoder_mel_frames(samples, expected):
    assert {context: encoder_mel_frames(samples, context) for context in ENCODER_CONTEXTS} == expected


@pytest.mark.parametrize("context", ENCODER_CONTEXTS)
def test_encoder_mel_frames_always_cover_the_kept_positions(context):
    step = {"30": 3000, "10": 1000, "5": 500, "audio": 2}[context]
    for samples in range(0, 30 * SECOND + 1, 1237):
        frames = encoder_mel_frames(samples, context)
        assert 2 * whisper_frame_count(samples) <= frames <= 3000
        assert frames % step == 0 or frames == 3000


@pytest.mark.parametrize("context", ["15", "", "AUDIO", 10, None])
def test_encoder_mel_frames_refuses_other_contexts(context):
    with pytest.raises(ValueError, match="30, 10, 5, audio"):
        encoder_mel_frames(SECOND, context)


def with_context(omni: MiniOmni, context: str) -> MiniOmni:
    """The session's pipeline (same weights) with another encoder context."""
    return MiniOmni(omni.model, omni.encoder, omni.codec, omni.tokenizer, omni.device, omni.dtype,
                    encoder_context=context, plan=omni.plan)


def encode(omni: MiniOmni, audio, frames: int, allow_short: bool) -> torch.Tensor:
    """Whisper on the first ``frames`` mel frames of the 30 s-padded audio, the kept positions."""
    with torch.inference_mode():
        mel = log_mel_spectrogram(audio)[:, :frames]
        return omni.encoder(mel.unsqueeze(0), allow_short=allow_short)[:, : whisper_frame_count(len(audio))].float()


def test_30_is_the_default_and_reads_the_whole_window(omni):
    audio = speech_like(3.0)
    assert omni.encoder_context == "30"
    features = omni.encode_audio(audio)
    assert features.shape[1] == whisper_frame_count(len(audio)) == 151
    assert torch.equal(features, encode(omni, audio, 3000, allow_short=False))


def test_audio_reads_only_the_frames_that_are_kept(omni):
    audio = speech_like(3.0)
    frames = whisper_frame_count(len(audio))
    features = with_context(omni, "audio").encode_audio(audio)
    assert torch.equal(features, encode(omni, audio, 2 * frames, allow_short=True))
    assert not torch.equal(features, omni.encode_audio(audio))  # attention over less audio changes them


@pytest.mark.parametrize(("context", "seconds", "frames"), [("10", 3.0, 1000), ("10", 12.0, 2000),
                                                          ("5", 3.0, 500), ("5", 7.5, 1000), ("5", 12.0, 1500)])
def test_10_and_5_read_whole_steps(omni, context, seconds, frames):
    audio = speech_like(seconds)
    features = with_context(omni, context).encode_audio(audio)
    assert features.shape[1] == whisper_frame_count(len(audio))
    assert torch.equal(features, encode(omni, audio, frames, allow_short=True))
    assert not torch.equal(features, omni.encode_audio(audio))


def test_a_prompt_has_the_same_length_whatever_the_context(omni, question_wav):
    lengths = {context: with_context(omni, context).prepare(audio=question_wav).prompt_length
               for context in ENCODER_CONTEXTS}
    assert set(lengths.values()) == {omni.prepare(audio=question_wav).prompt_length}


@pytest.mark.parametrize("context", ["15", "fast", 30, True])
def test_the_pipeline_refuses_other_contexts(omni, tmp_path, context):
    import miniomni

    with pytest.raises(MiniOmniError, match="'30', '10', '5', 'audio'"):
        with_context(omni, context)
    with pytest.raises(MiniOmniError, match="not one of"):  # before the checkpoint is even looked for
        miniomni.load(tmp_path / "missing", device="cpu", encoder_context=context)


def test_generate_passes_the_encoder_context(capsys, checkpoint_dir, question_wav, tmp_path, monkeypatch):
    import miniomni.pipeline
    from miniomni.cli import main

    asked = []
    real_load = miniomni.pipeline.load

    def load(*args, **kwargs):
        asked.append(kwargs["encoder_context"])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(miniomni.pipeline, "load", load)
    common = ["generate", "--checkpoint", str(checkpoint_dir), "--audio", str(question_wav), "--task", "A1T2",
              "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "a.wav")]
    for flags in ([], ["--encoder-context", "5"], ["--fast-encoder"]):
        assert main(common + flags) == 0, capsys.readouterr().err
    assert asked == ["30", "5", "audio"]


def test_serve_defaults_to_its_own_context():
    from miniomni.cli import build_parser
    from miniomni.server.settings import SERVE_ENCODER_CONTEXT

    parser = build_parser()
    assert SERVE_ENCODER_CONTEXT in ENCODER_CONTEXTS and SERVE_ENCODER_CONTEXT != "30"
    assert parser.parse_args(["serve", "--checkpoint", "c"]).encoder_context == SERVE_ENCODER_CONTEXT
    assert parser.parse_args(["serve", "--checkpoint", "c", "--encoder-context", "30"]).encoder_context == "30"
    assert parser.parse_args(["serve", "--checkpoint", "c", "--fast-encoder"]).encoder_context == "audio"
    both = ["serve", "--checkpoint", "c", "--fast-encoder", "--encoder-context", "audio"]
    assert parser.parse_args(both).encoder_context == "audio"  # the same choice twice is fine


@pytest.mark.parametrize(("flags", "message"), [
    (["--encoder-context", "15"], "invalid choice: '15' (choose from '30', '10', '5', 'audio')"),
    (["--encoder-context", "10", "--fast-encoder"], "--fast-encoder (encoder context audio) contradicts "
                                                    "--encoder-context 10"),
])
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_the_cli_refuses_a_bad_encoder_context(capsys, command, flags, message):
    from miniomni.cli import build_parser

    source = ["--text", "hi"] if command == "generate" else []
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--checkpoint", "c", *source, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_ray_serve_reads_the_encoder_context():
    from miniomni.server.rayserve import _encoder_context
    from miniomni.server.settings import SERVE_ENCODER_CONTEXT

    assert _encoder_context({}) == SERVE_ENCODER_CONTEXT
    assert _encoder_context({"encoder_context": "5"}) == "5"
    assert _encoder_context({"fast_encoder": "true"}) == "audio"
    assert _encoder_context({"fast_encoder": "false", "encoder_context": "30"}) == "30"
    with pytest.raises(ValueError, match="contradicts"):
        _encoder_context({"fast_encoder": "yes", "encoder_context": "10"})
    with pytest.raises(ValueError, match="not one of"):
        _encoder_context({"encoder_context": "7"})
