"""Evaluation: normalization and WER against hand-computed cases and openai-whisper's normalizer,
and the three ``eval`` commands end to end on the tiny random checkpoint (plumbing, never quality)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import soundfile as sf
from conftest import speech_like

from miniomni.eval.cli import add_eval_command, run_eval
from miniomni.eval.normalize import normalize_text, words_to_digits
from miniomni.eval.spoken_qa import is_correct
from miniomni.eval.wer import corpus_wer, word_errors

# Sentences on which our normalizer claims to agree with Whisper's EnglishTextNormalizer.
AGREED = [
    "Hello, World!",
    "I have twenty one apples.",
    "One hundred people came.",
    "It's raining; we can't go [laughter] out.",
    "Um, I think (inaudible) it's fine.",
    "My favourite colour is grey.",
    "They're here and we'll see; I'm sure you've won't.",
    "Two thousand three hundred and five",
    "The price is $5.50, about 10%.",
    "Café naïve résumé",
    "twenty-one",
    "seven million two hundred thousand",
    "He said hmm, uh, okay.",
    "Mr. Smith met Dr. Jones.",
    "ninety nine bottles of forty two",
    "One of them is one hundred and twelve.",
    "Let's go, y'all! I'm gonna win.",
    "She'd like <noise> the theatre centre.",
    "It was the end. Then 2.5 more, or 1,000.",
    "zero",
]


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    ("twenty one", "21"),
    ("twenty-one", "21"),
    ("one hundred", "100"),
    ("three hundred and forty five thousand six hundred", "345600"),
    ("I can't, won't and shouldn't", "i can not will not and should not"),
    ("they're sure we'll go", "they are sure we will go"),
    ("keep [noise] this (aside) <unk> part", "keep this part"),
    ("um so uh hmm yes", "so yes"),
    ("The colour of the centre", "the color of the center"),
    ("pi is 3.14, not 3!", "pi is 3.14 not 3"),
    ("two three four", "2 3 4"),
    ("  spaced\t\nout  ", "spaced out"),
])
def test_normalize_hand_cases(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_words_to_digits_keeps_lone_one_and_other_words() -> None:
    assert words_to_digits("one of the twenty two") == "one of the 22"
    assert words_to_digits("hundred thousand") == "100000"
    assert words_to_digits("nothing here") == "nothing here"


def test_normalizer_matches_openai_whisper_on_claimed_cases() -> None:
    from whisper.normalizers import EnglishTextNormalizer  # test-only reference

    reference = EnglishTextNormalizer()
    for sentence in AGREED:
        assert normalize_text(sentence) == reference(sentence).strip(), sentence


def test_wer_hand_cases() -> None:
    assert word_errors("Hello, World!", "hello world").wer == 0
    assert word_errors("twenty one", "21").wer == 0
    assert word_errors("it's here", "it is here").wer == 0
    # [+zulu] alpha (bravo->xray) charlie [-delta] echo: 1 S, 1 D, 1 I over 5 reference words
    errors = word_errors("Alpha bravo charlie delta echo.", "zulu alpha xray charlie echo")
    assert (errors.substitutions, errors.deletions, errors.insertions, errors.hits) == (1, 1, 1, 3)
    assert errors.wer == pytest.approx(3 / 5)
    errors = word_errors("the cat sat on the mat", "the cat sit on mat")
    assert (errors.substitutions, errors.deletions, errors.insertions, errors.hits) == (1, 1, 0, 4)
    assert errors.wer == pytest.approx(2 / 6)
    errors = word_errors("a b c", "x a b c")
    assert (errors.substitutions, errors.deletions, errors.insertions) == (0, 0, 1)
    # empty sides are handled without jiwer
    assert word_errors("", "hello there").as_dict()["insertions"] == 2
    assert word_errors("", "").wer is None
    assert word_errors("two words", "").deletions == 2


def test_corpus_wer_is_total_edits_over_total_reference_words() -> None:
    total = corpus_wer(["a b c d", "e f"], ["a b c d", "x"])  # 0 edits / 4, then 1 S + 1 D / 2
    assert (total.substitutions, total.deletions, total.insertions) == (1, 1, 0)
    assert total.reference_words == 6
    assert total.wer == pytest.approx(2 / 6)  # not the mean of per-pair WERs (0.5)


def test_substring_match_is_on_normalized_text() -> None:
    assert is_correct("The capital is PARIS, of course.", ["Paris"])
    assert is_correct("It has twenty one legs", ["21"])
    assert not is_correct("London", ["Paris", ""])


# ------------------------------------------------------------------- end to end on the tiny model

def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="miniomni")
    add_eval_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _check_files(prefix: Path) -> dict:
    for suffix in ("json", "md", "png"):
        path = prefix.with_name(prefix.name + "." + suffix)
        assert path.exists() and path.stat().st_size > 0, path
    assert prefix.with_name(prefix.name + ".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(prefix.with_name(prefix.name + ".json").read_text())


@pytest.fixture(scope="module")
def librispeech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("libri")
    chapter = root / "19" / "198"
    chapter.mkdir(parents=True)
    lines = []
    for index, text in enumerate(["HELLO WORLD", "TWENTY ONE APPLES"]):
        utterance = f"19-198-{index:04d}"
        sf.write(chapter / f"{utterance}.flac", speech_like(1.0, seed=index), 16000)
        lines.append(f"{utterance} {text}")
    (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qa")
    rows = []
    for index, answers in enumerate([["Paris"], ["twenty one", "21"]]):
        sf.write(root / f"q{index}.wav", speech_like(1.0, seed=10 + index), 16000, subtype="PCM_16")
        rows.append({"audio": f"q{index}.wav", "answers": answers})
    path = root / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_eval_asr_end_to_end(checkpoint_dir: Path, librispeech_dir: Path, tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "asr"
    args = _parse(["eval", "asr", "--checkpoint", str(checkpoint_dir), "--data", str(librispeech_dir),
                   "--out", str(prefix), "--max-new-tokens", "6", "--device", "cpu"])
    assert run_eval(args) == 0
    assert json.loads(capsys.readouterr().out)["files"]["json"] == str(prefix) + ".json"
    report = _check_files(prefix)
    assert report["utterances"] == 2 and len(report["rows"]) == 2
    summary = report["summary"]
    assert summary["reference_words"] == 4  # "hello world" + "21 apples"
    assert summary["errors"] == summary["substitutions"] + summary["deletions"] + summary["insertions"]
    assert summary["wer"] == pytest.approx(summary["errors"] / 4)
    row = report["rows"][1]
    assert row["reference_normalized"] == "21 apples"
    assert {"hypothesis", "wer", "latency_s", "audio_seconds"} <= set(row)
    assert row["audio_seconds"] == pytest.approx(1.0)
    markdown = prefix.with_name("asr.md").read_text()
    assert "| utterances | 2 |" in markdown and "WER (%)" in markdown and "asr.png" in markdown

    args = _parse(["eval", "asr", "--checkpoint", str(checkpoint_dir), "--data", str(librispeech_dir),
                   "--out", str(tmp_path / "one.json"), "--max-new-tokens", "2", "--limit", "1", "--device", "cpu"])
    assert run_eval(args) == 0
    assert json.loads((tmp_path / "one.json").read_text())["utterances"] == 1


def test_eval_spoken_qa_end_to_end(checkpoint_dir: Path, questions: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "qa"
    args = _parse(["eval", "spoken-qa", "--checkpoint", str(checkpoint_dir), "--data", str(questions),
                   "--out", str(prefix), "--max-new-tokens", "9", "--device", "cpu"])
    assert args.task == "A1A2-batch" and args.judge == "self"
    assert run_eval(args) == 0
    report = _check_files(prefix)
    assert report["judge"] == "self" and len(report["rows"]) == 2
    summary = report["summary"]
    assert summary["questions"] == 2 and summary["speech_scored"] == 2
    assert 0 <= summary["text_accuracy"] <= 1 and 0 <= summary["speech_accuracy"] <= 1
    for row in report["rows"]:
        assert isinstance(row["text_answer"], str) and isinstance(row["speech_transcript"], str)
        assert isinstance(row["text_correct"], bool) and isinstance(row["speech_correct"], bool)
        assert row["speech_seconds"] > 0 and row["latency_s"] > 0
    assert report["rows"][1]["answers"] == ["twenty one", "21"]
    assert "speech accuracy (%)" in prefix.with_name("qa.md").read_text()

    # text-only task: no spoken answer to judge
    args = _parse(["eval", "spoken-qa", "--checkpoint", str(checkpoint_dir), "--data", str(questions),
                   "--out", str(tmp_path / "qa_text"), "--max-new-tokens", "4", "--task", "A1T2", "--limit", "1",
                   "--device", "cpu"])
    assert run_eval(args) == 0
    report = json.loads((tmp_path / "qa_text.json").read_text())
    assert report["summary"]["speech_accuracy"] is None and report["summary"]["questions"] == 1


def test_eval_consistency_end_to_end(checkpoint_dir: Path, questions: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "cons"
    # omni:CHECKPOINT judge: another miniomni checkpoint's asr task (here the same tiny one)
    args = _parse(["eval", "consistency", "--checkpoint", str(checkpoint_dir), "--data", str(questions.parent),
                   "--out", str(prefix), "--max-new-tokens", "9", "--judge", f"omni:{checkpoint_dir}",
                   "--device", "cpu"])
    assert run_eval(args) == 0
    report = _check_files(prefix)
    assert report["judge"].startswith("omni:") and len(report["rows"]) == 2
    summary = report["summary"]
    assert summary["rows"] == 2
    assert summary["reference_words"] == sum(r["text_words"] for r in report["rows"])
    assert summary["hypothesis_words"] == sum(r["speech_words"] for r in report["rows"])
    for row in report["rows"]:
        assert row["wer"] is None or row["wer"] >= 0
        assert row["length_ratio"] is None or row["length_ratio"] >= 0
    assert "spoken / text words" in prefix.with_name("cons.md").read_text()


def test_eval_rejects_bad_input(checkpoint_dir: Path, tmp_path: Path) -> None:
    from miniomni.errors import MiniOmniError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "missing.wav", "answers": ["x"]}\n')
    args = _parse(["eval", "spoken-qa", "--checkpoint", str(checkpoint_dir), "--data", str(bad),
                   "--out", str(tmp_path / "r"), "--device", "cpu"])
    with pytest.raises(MiniOmniError, match="missing"):
        run_eval(args)
    args = _parse(["eval", "asr", "--checkpoint", str(checkpoint_dir), "--data", str(tmp_path),
                   "--out", str(tmp_path / "r"), "--device", "cpu"])
    with pytest.raises(MiniOmniError, match="trans.txt"):
        run_eval(args)
