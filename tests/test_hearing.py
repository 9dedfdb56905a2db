"""Teaching a model to hear: text-answer data, ASR rows from spoken questions, the loss at trained
positions only, answers written by the LM, the agreement of spoken and written answers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import random_omni, speech_like, tiny_config

from miniomni import tokens as tk
from miniomni.cli import main
from miniomni.data import SynthOptions, read_voiceassistant, synthesize
from miniomni.data.lmanswer import answer_questions, spoken_answer
from miniomni.errors import ConfigError, MiniOmniError
from miniomni.eval.agreement import AGREE_F1, evaluate_agreement, word_f1, write_agreement_report
from miniomni.eval.asr import evaluate_asr
from miniomni.tokens import EOT, Task, padding_ids
from miniomni.train import IGNORE, build_example, collate_batch
from miniomni.train.loss import STREAMS, loss
from miniomni.train.recipe import Recipe

PAIRS = [("What is a piano?", "A piano is an instrument."), ("Where do owls live?", "Owls live in trees."),
         ("Is rice healthy?", "Rice gives you energy.")]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    """Spoken questions with text answers, as `data synth --text-answers` writes them (espeak-ng)."""
    work = tmp_path_factory.mktemp("spoken")
    source = work / "qa.jsonl"
    source.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PAIRS))
    out = work / "spoken"
    manifest = synthesize(source, out, SynthOptions(snac=None, text_answers=True, progress=False))
    assert manifest["written"] == len(PAIRS) and manifest["answer_hours"] == 0
    return out


def test_text_answer_rows_keep_the_answer_text_and_no_codes(spoken):
    rows = [r for path in sorted((spoken / "data").glob("*.parquet")) for r in pq.read_table(path).to_pylist()]
    assert [(r["question"], r["answer"]) for r in rows] == PAIRS
    assert all(r["answer_snac"] == "" and r["question_audio"]["bytes"][:4] == b"RIFF" for r in rows)


def test_spoken_questions_read_as_asr_a1t2_and_t1t2(spoken):
    asr = list(read_voiceassistant(spoken, task="ASR"))  # the folder `data synth` writes, data/ inside
    assert [r.answer_text for r in asr] == [q for q, _ in PAIRS]
    assert all(r.task == Task.ASR and r.question_audio.size > 8000 for r in asr)
    a1t2 = list(read_voiceassistant(spoken, task="A1T2"))
    assert [r.answer_text for r in a1t2] == [a for _, a in PAIRS]
    t1t2 = list(read_voiceassistant(spoken, task="T1T2"))
    assert [r.question_text for r in t1t2] == [q for q, _ in PAIRS] and t1t2[0].question_audio is None
    with pytest.raises(MiniOmniError, match="no spoken answer.*--text-answers"):
        next(read_voiceassistant(spoken, task="A1A2"))


def test_spoken_answers_still_need_a_codec(tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text(json.dumps({"question": "Hi?", "answer": "Hello."}) + "\n")
    with pytest.raises(MiniOmniError, match="--snac.*--text-answers"):
        synthesize(source, tmp_path / "out", SynthOptions(snac=None, progress=False))


def test_cli_synth_text_answers(tmp_path, capsys):
    source = tmp_path / "qa.jsonl"
    source.write_text(json.dumps({"question": "What is a kite?", "answer": "A kite flies."}) + "\n")
    assert main(["data", "synth", "--input", str(source), "--out", str(tmp_path / "out"), "--text-answers",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 1 and summary["answer_hours"] == 0


# ------------------------------------------------------------------ the loss at trained positions only


def test_loss_at_trained_positions_equals_the_full_logits_loss():
    model = random_omni(tiny_config(), seed=5).train()
    features = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    batch = collate_batch([
        build_example(Task.A1A2, [7, 8], torch.randint(0, 4096, (7, 3)), audio_features=features),
        build_example(Task.ASR, [9, 10, 11], audio_features=features[:3]),
        build_example(Task.T1T2, [12], question_ids=[3, 4]),
    ])
    total, parts = loss(model, batch, return_parts=True)
    total.backward()
    fast_grad = model.llm.lm_head.weight.grad.clone()
    model.zero_grad()
    # The same loss from every position's logits over the whole heads.
    text_logits, audio_logits = model(batch.input_ids, audio_features=batch.audio_features,
                                      audio_lengths=batch.audio_lengths)
    ce = torch.nn.functional.cross_entropy
    expected = {"text": ce(text_logits.flatten(0, 1), batch.targets[:, tk.TEXT_STREAM].flatten(), ignore_index=IGNORE)}
    for layer in range(7):
        targets = batch.targets[:, layer]
        local = torch.where(targets == IGNORE, IGNORE, targets - tk.LAYER_SHIFTS[layer])
        expected[f"audio{layer}"] = ce(audio_logits[:, :, layer].flatten(0, 1), local.flatten(), ignore_index=IGNORE)
    reference = sum(expected.values())
    reference.backward()
    for name in STREAMS:
        assert torch.allclose(parts[name], expected[name], atol=1e-5), name
    assert torch.allclose(fast_grad, model.llm.lm_head.weight.grad, atol=1e-6)
    assert float(total.detach()) > 0


def test_a_stream_without_targets_adds_zero_and_keeps_the_graph():
    model = random_omni(tiny_config(), seed=6).train()
    batch = collate_batch([build_example(Task.T1T2, [12, 13], question_ids=[3])])
    total, parts = loss(model, batch, return_parts=True)
    assert all(float(parts[f"audio{i}"]) == 0.0 for i in range(7)) and float(parts["text"]) > 0
    total.backward()
    assert model.llm.lm_head.weight.grad is not None


# ------------------------------------------------------------------ answers written by the LM


def _greedy_without_cache(model, ids: list[int], stop: int, vocab: int, steps: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            x = torch.tensor([ids + out])
            streams = padding_ids().view(1, 8, 1).repeat(1, 1, x.shape[1])  # _pad_a on the audio streams
            streams[:, 7] = x
            hidden = model.hidden_states(streams)
            logits = model.text_logits(hidden[:, -1])[0]
            token = int(torch.cat((logits[:vocab], logits[EOT:EOT + 1])).argmax())
            if token in (stop, vocab):  # vocab: the _eot column
                break
            out.append(token)
    return out


def test_lm_answers_are_greedy_batched_and_in_order(omni):
    tokenizer = omni.tokenizer
    questions = ["What is your name?", "How are you?", "What is your name?", "Hello"]
    answers = answer_questions(omni.model, tokenizer, questions, template="{system}{question}", system="",
                               stops=["<|endoftext|>"], max_new_tokens=6, batch_size=2)
    assert answers[0] == answers[2]  # same question, same greedy answer, whatever its batch
    vocab = tokenizer.get_vocab_size()
    stop = tokenizer.token_to_id("<|endoftext|>")
    for question, answer in zip(questions, answers, strict=True):
        ids = tokenizer.encode(question, add_special_tokens=False).ids
        expected = _greedy_without_cache(omni.model, ids, stop, vocab, 6)
        assert answer == tokenizer.decode(expected, skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="stop tokens"):
        answer_questions(omni.model, tokenizer, questions, stops=["<|nope|>"])


@pytest.mark.parametrize(("raw", "kept"), [
    ("Bees make honey. They collect nectar. Then more", "Bees make honey. They collect nectar."),
    ("**Paris** is famous.\n\n1. The Eiffel Tower", "Paris is famous."),
    ("An answer that never ends", ""),
    ("One! Two? Three.", "One! Two?"),
])
def test_spoken_answer_keeps_whole_sentences(raw, kept):
    assert spoken_answer(raw, max_sentences=2) == kept


# ------------------------------------------------------------------ evaluation on spoken questions


def test_word_f1_and_the_agreement_threshold():
    assert word_f1("Owls live in trees.", "owls live in trees") == 1.0
    assert word_f1("owls live in trees", "rice gives energy") == 0.0
    assert word_f1("", "") == 1.0 and word_f1("a", "") == 0.0
    half = word_f1("owls live in old trees", "owls live in caves")  # 3 common: P 3/4, R 3/5
    assert half == pytest.approx(2 * 0.75 * 0.6 / 1.35) and half >= AGREE_F1


def test_asr_and_agreement_read_spoken_questions(omni, spoken, tmp_path):
    asr = evaluate_asr(omni, spoken, max_new_tokens=4)
    assert asr["utterances"] == len(PAIRS)
    assert [r["reference"] for r in asr["rows"]] == [q for q, _ in PAIRS]
    assert asr["summary"]["reference_words"] == sum(len(q.split()) for q, _ in PAIRS)
    report = evaluate_agreement(omni, spoken, limit=2, max_new_tokens=4)
    assert report["summary"]["questions"] == 2
    for row in report["rows"]:
        assert row["f1"] == word_f1(row["text_answer"], row["spoken_answer"])
    files = write_agreement_report(report, tmp_path / "agreement")
    assert json.loads(Path(files["json"]).read_text())["summary"] == report["summary"]
    with pytest.raises(MiniOmniError, match="not found"):
        evaluate_asr(omni, tmp_path / "missing")


def test_cli_eval_agreement(checkpoint_dir, spoken, tmp_path, capsys):
    assert main(["eval", "agreement", "--checkpoint", str(checkpoint_dir), "--data", str(spoken), "--limit", "1",
                 "--max-new-tokens", "3", "--encoder-context", "10", "--out", str(tmp_path / "g")]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["questions"] == 1 and 0 <= summary["mean_f1"] <= 1


def test_recipe_encoder_context_is_checked(tmp_path):
    base = {"model": "m", "output_dir": "o", "train": ["adapter.*"],
            "data": {"sources": [{"kind": "jsonl", "path": "x.jsonl"}]}}
    assert Recipe.from_dict(base).data.encoder_context == "30"
    assert Recipe.from_dict({**base, "data": {**base["data"], "encoder_context": 10}}).data.encoder_context == "10"
    with pytest.raises(ConfigError, match="encoder_context"):
        Recipe.from_dict({**base, "data": {**base["data"], "encoder_context": "7"}})


def test_a_source_without_records_is_named(tmp_path, checkpoint_dir):
    from miniomni.train.trainer import Trainer

    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = Recipe.from_dict({"model": str(checkpoint_dir), "output_dir": str(tmp_path / "run"),
                               "train": ["adapter.*"], "device": "cpu",
                               "data": {"sources": [{"kind": "voiceassistant", "path": str(empty)}]}})
    with pytest.raises(MiniOmniError, match=f"voiceassistant {empty} holds no records"):
        Trainer(recipe, progress=False)


def test_speech_like_questions_make_asr_examples(spoken, omni):
    """ASR rows from spoken questions collate with the question text as the target."""
    from tokenizers import Tokenizer

    from miniomni.train import collate_record

    tokenizer = Tokenizer.from_str(omni.tokenizer.to_str())
    record = next(read_voiceassistant(spoken, task="ASR"))
    example = collate_record(record, tokenizer, lambda audio: omni.encode_audio(audio))
    text = tokenizer.decode([int(t) for t in example.targets[tk.TEXT_STREAM] if t not in (IGNORE, tk.EOT)])
    assert text == PAIRS[0][0]
    assert example.audio_features is not None and example.audio_length > 0
    assert speech_like(0.1).size == 1600
