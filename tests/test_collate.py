"""Training layout (docs/training.md): hand-written layouts, forced-inference equality, loss, bucketing, readers."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import random_omni, speech_like, tiny_config

from miniomni import tokens as tk
from miniomni.data import Record, read_jsonl, read_librispeech, read_voiceassistant
from miniomni.errors import MiniOmniError
from miniomni.generate import AnswerState, DecodeInput
from miniomni.tokens import Task
from miniomni.train import (
    IGNORE,
    CachedFeatures,
    FeatureCache,
    TrainingExample,
    bucket_by_length,
    build_example,
    collate_batch,
    collate_record,
    padding_fraction,
)
from miniomni.train.loss import loss

# Short names for writing layouts by hand.
p, e, pt = tk.PAD_A, tk.EOA, tk.PAD_T
X = IGNORE
CODES = [10, 11, 12, 13, 14, 15, 16]  # one SNAC frame: layer i carries 10 + i
FRAME = torch.tensor(CODES).view(7, 1)


def shifted(rows):
    """Audio rows written with local ids -> absolute ids (X stays X)."""
    return [[x if x == X else tk.layershift(x, layer) for x in row] for layer, row in enumerate(rows)]


def features(frames=2, dim=32, seed=0):
    return torch.randn(frames, dim, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ hand-written layouts


def test_t1a2_layout_targets_and_mask_by_hand():
    ex = build_example(Task.T1A2, [7, 8], FRAME, question_ids=[3, 4])
    # Prompt (5 positions), then L = max(n+1, N+8) = max(3, 9) = 9 answer steps.
    audio = [
        [p, p, p, p, tk.ANSWER_A, p, 10, e, p, p, p, p, p, p],
        [p, p, p, p, tk.ANSWER_A, p, p, 11, e, p, p, p, p, p],
        [p, p, p, p, tk.ANSWER_A, p, p, p, 12, e, p, p, p, p],
        [p, p, p, p, tk.ANSWER_A, p, p, p, p, 13, e, p, p, p],
        [p, p, p, p, tk.ANSWER_A, p, p, p, p, p, 14, e, p, p],
        [p, p, p, p, tk.ANSWER_A, p, p, p, p, p, p, 15, e, p],
        [p, p, p, p, tk.ANSWER_A, p, p, p, p, p, p, p, 16, e],
    ]
    text = [tk.INPUT_T, 3, 4, tk.EOT, tk.ANSWER_T, 7, 8, tk.EOT, pt, pt, pt, pt, pt, pt]
    assert ex.input_ids.tolist() == shifted(audio) + [text]
    assert ex.prompt_length == 5 and ex.length == 14 and ex.audio_features is None
    # Position q predicts the token at q+1; delay pads, pads after _eoa and _pad_t after _eot are masked.
    audio_targets = [
        [X, X, X, X, X, 10, e, X, X, X, X, X, X, X],
        [X, X, X, X, X, X, 11, e, X, X, X, X, X, X],
        [X, X, X, X, X, X, X, 12, e, X, X, X, X, X],
        [X, X, X, X, X, X, X, X, 13, e, X, X, X, X],
        [X, X, X, X, X, X, X, X, X, 14, e, X, X, X],
        [X, X, X, X, X, X, X, X, X, X, 15, e, X, X],
        [X, X, X, X, X, X, X, X, X, X, X, 16, e, X],
    ]
    text_targets = [X, X, X, X, 7, 8, tk.EOT, X, X, X, X, X, X, X]
    assert ex.targets.tolist() == shifted(audio_targets) + [text_targets]


def test_audio_padding_can_be_trained():
    ex = build_example(Task.T1A2, [7, 8], FRAME, question_ids=[3, 4], mask_audio_padding=False)
    assert ex.targets[0].tolist() == shifted([[X, X, X, X, p, 10, e, p, p, p, p, p, p, X]])[0]
    assert ex.targets[6].tolist() == [X] * 4 + [tk.layershift(x, 6) for x in [p] * 7 + [16, e]] + [X]
    assert ex.targets[7].tolist() == [X, X, X, X, 7, 8, tk.EOT] + [X] * 7  # _pad_t after _eot: never


def test_t1t2_layout_by_hand():
    ex = build_example(Task.T1T2, [7, 8], question_ids=[3, 4])
    assert ex.input_ids.tolist() == shifted([[p] * 8] * 7) + [[tk.INPUT_T, 3, 4, tk.EOT, tk.ANSWER_T, 7, 8, tk.EOT]]
    assert ex.targets.tolist() == [[X] * 8] * 7 + [[X, X, X, X, 7, 8, tk.EOT, X]]


@pytest.mark.parametrize("task, last_a, last_t", [
    (Task.A1T2, tk.PAD_A, tk.ANSWER_T),
    (Task.ASR, tk.PAD_A, tk.ASR),
])
def test_text_answer_to_audio_layout_by_hand(task, last_a, last_t):
    ex = build_example(task, [7], audio_features=features(2))
    audio_row = [tk.INPUT_A, p, p, e, last_a, p, p]
    assert ex.input_ids.tolist() == shifted([audio_row] * 7) + [[tk.INPUT_T, pt, pt, tk.EOT, last_t, 7, tk.EOT]]
    assert ex.targets.tolist() == [[X] * 7] * 7 + [[X, X, X, X, 7, tk.EOT, X]]
    assert ex.audio_length == 2 and ex.audio_features.shape == (2, 32)


def test_a1a2_layout_by_hand():
    ex = build_example(Task.A1A2, [7], FRAME, audio_features=features(1))
    # Prompt: _input_a, _pad_a x1, _eoa, _answer_a | text _input_t, _pad_t, _eot, _answer_t; 9 answer steps.
    assert ex.input_ids[0].tolist() == shifted([[tk.INPUT_A, p, e, tk.ANSWER_A, p, 10, e, p, p, p, p, p, p]])[0]
    assert ex.input_ids[6].tolist() == [tk.layershift(x, 6) for x in [tk.INPUT_A, p, e, tk.ANSWER_A] + [p] * 7
                                        + [16, e]]
    assert ex.input_ids[7].tolist() == [tk.INPUT_T, pt, tk.EOT, tk.ANSWER_T, 7, tk.EOT] + [pt] * 7
    assert ex.targets[7].tolist() == [X, X, X, 7, tk.EOT] + [X] * 8
    assert ex.targets[3].tolist() == [X] * 7 + [tk.layershift(13, 3), tk.layershift(e, 3)] + [X] * 4
    # The batch approach trains its row 0, which is A1A2.
    batch = build_example(Task.A1A2_BATCH, [7], FRAME, audio_features=features(1))
    assert batch.task is Task.A1A2 and torch.equal(batch.input_ids, ex.input_ids)


def test_long_text_extends_the_audio_with_pads():
    ex = build_example(Task.T1A2, list(range(20, 32)), FRAME, question_ids=[3])  # n=12 > N+7
    assert ex.answer_length == 13
    assert ex.input_ids[7, 4:].tolist() == list(range(20, 32)) + [tk.EOT]
    assert ex.input_ids[6, 4:].tolist() == [tk.layershift(x, 6) for x in [p] * 7 + [16, e] + [p] * 4]


# ------------------------------------------------------- forced inference equals the layout


def forced_feed(example: TrainingExample, task: Task):
    """Run AnswerState's feeding rules, forcing each step to sample the example's answer tokens."""
    P, L = example.prompt_length, example.answer_length
    prompt = example.input_ids[:, :P]
    if task == Task.A1A2_BATCH:
        frames = example.audio_length
        prompts = torch.stack([prompt, tk.audio_prompt(frames, Task.A1T2)])
        inputs = DecodeInput(task, prompts, example.audio_features.expand(2, -1, -1), [frames, frames])
    else:
        inputs = DecodeInput(task, prompt.unsqueeze(0))
    state = AnswerState(inputs, None, None, torch.device("cpu"))
    fed, ends = [], []
    for j in range(L):
        column = example.input_ids[:, P + j]
        text_logits = None
        if state.needs_text_head:
            text_logits = torch.zeros(1, tk.PADDED_TEXT_VOCAB_SIZE)
            text_logits[0, column[7]] = 1.0
        audio_logits = None
        if state.needs_audio_head:
            audio_logits = torch.zeros(7, tk.PADDED_AUDIO_VOCAB_SIZE)
            for layer in range(7):
                audio_logits[layer, tk.unshift(int(column[layer]), layer)] = 1.0
        step = state.advance(text_logits, audio_logits)
        ends.append(step.end)
        if state.finished:
            break
        assert state.position == P + j
        fed.append(state.next_ids())
    return torch.stack(fed, dim=-1), ends



@pytest.mark.parametrize("task", [Task.A1A2, Task.A1A2_BATCH, Task.T1A2, Task.T1T2, Task.ASR, Task.A1T2])
def test_forced_inference_feeds_exactly_the_training_layout(task):
    rng = random.Random(0)
    answer = [rng.randrange(400) for _ in range(5)]
    frames = torch.randint(0, 4096, (7, 6), generator=torch.Generator().manual_seed(1))
    speech = frames if task.audio_output else None
    if task.audio_input:
        ex = build_example(task, answer, speech, audio_features=features(3))
    else:
        ex = build_example(task, answer, speech, question_ids=[3, 4, 5])
    fed, ends = forced_feed(ex, task)
    P, L = ex.prompt_length, ex.answer_length
    assert (6 + 8 if task.audio_output else 5 + 1) == L
    # Generation stops exactly at the last answer column (layer 6 _eoa, or _eot) ...
    assert len(ends) == L and ends[-1] == ("eoa" if task.audio_output else "eot")
    # ... and every earlier sampled step is fed back exactly as the training input holds it (row 0).
    assert torch.equal(fed[0], ex.input_ids[:, P : P + L - 1])
    if task == Task.A1A2_BATCH:
        assert torch.equal(fed[1, 7], ex.input_ids[7, P : P + L - 1])  # row 1 gets the same text
    # The frames round-trip through the inference-side undelay.
    if task.audio_output:
        sampled = [[tk.unshift(int(x), layer) for x in ex.input_ids[layer, P:]] for layer in range(7)]
        assert torch.equal(tk.undelay(sampled), frames)


# ----------------------------------------------------------------- batches, loss, buckets


def test_collate_batch_pads_and_carries_features():
    speech = build_example(Task.A1A2, [7, 8], FRAME, audio_features=features(3))
    text = build_example(Task.T1T2, [7], question_ids=[3])
    asr = build_example(Task.ASR, [9, 9, 9], audio_features=features(1, seed=2))
    batch = collate_batch([speech, text, asr])
    T = speech.length
    assert batch.input_ids.shape == batch.targets.shape == (3, 8, T)
    pad_column = [tk.layershift(p, layer) for layer in range(7)] + [pt]
    assert batch.input_ids[1, :, text.length:].T.tolist() == [pad_column] * (T - text.length)
    assert (batch.targets[1, :, text.length:] == X).all()
    assert torch.equal(batch.input_ids[2, :, : asr.length], asr.input_ids)
    assert batch.audio_features.shape == (3, 3, 32) and batch.audio_lengths == [3, 0, 1]
    assert torch.equal(batch.audio_features[2, :1], asr.audio_features) and (batch.audio_features[1] == 0).all()
    assert collate_batch([text], pad_to=20).input_ids.shape == (1, 8, 20)
    with pytest.raises(ValueError):
        collate_batch([speech], pad_to=3)


@pytest.fixture(scope="module")
def tiny_model():
    return random_omni(tiny_config(), seed=3)


def test_padding_in_a_batch_does_not_change_the_loss(tiny_model):
    speech = build_example(Task.A1A2, [7, 8], FRAME, audio_features=features(3))
    text = build_example(Task.T1T2, [7], question_ids=[3])
    with torch.no_grad():
        alone = loss(tiny_model, collate_batch([text]))
        padded = loss(tiny_model, collate_batch([text], pad_to=text.length + 7))
        total, parts = loss(tiny_model, collate_batch([speech]), return_parts=True)
    assert torch.allclose(alone, padded, atol=1e-5)
    assert set(parts) == {"text", *(f"audio{i}" for i in range(7))}
    assert torch.isfinite(total) and torch.allclose(total, sum(parts.values()))
    # Hand check of one stream: text CE over the targets 7, 8, _eot at positions P-1 .. P+1.
    with torch.no_grad():
        text_logits, _ = tiny_model(speech.input_ids.unsqueeze(0), audio_features=speech.audio_features[None],
                                    audio_lengths=[3])
    P = speech.prompt_length
    expected = torch.nn.functional.cross_entropy(text_logits[0, P - 1 : P + 2], torch.tensor([7, 8, tk.EOT]))
    assert torch.allclose(parts["text"], expected, atol=1e-5)


def test_the_heads_run_only_where_a_target_is_with_the_loss_and_gradients_of_all_positions():
    model = random_omni(tiny_config(), seed=5)
    model.requires_grad_(True)
    batch = collate_batch([build_example(Task.ASR, [9, 9, 9], audio_features=features(3, seed=2)),
                           build_example(Task.A1A2, [7, 8], FRAME, audio_features=features(2)),
                           build_example(Task.T1T2, [7], question_ids=[3])])
    at = (batch.targets != X).any(dim=1)
    assert 0 < int(at.sum()) < at.numel() // 2  # most positions (prompts, padding) carry no target
    total, parts = loss(model, batch, return_parts=True)
    total.backward()
    masked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # The same loss from the logits of every position.
    text_logits, audio_logits = model(batch.input_ids, audio_features=batch.audio_features,
                                      audio_lengths=batch.audio_lengths)
    ce = torch.nn.functional.cross_entropy
    full = {"text": ce(text_logits.flatten(0, 1), batch.targets[:, 7].flatten(), ignore_index=X)}
    for layer in range(7):
        targets = batch.targets[:, layer]
        local = torch.where(targets == X, X, targets - tk.LAYER_SHIFTS[layer])
        full[f"audio{layer}"] = ce(audio_logits[:, :, layer].flatten(0, 1), local.flatten(), ignore_index=X)
    for name, value in full.items():
        assert torch.allclose(parts[name], value, atol=1e-5), name
    sum(full.values()).backward()
    for grad, param in zip(masked, model.parameters(), strict=True):
        assert torch.allclose(grad, param.grad, atol=1e-5)
    for wrong, last_only in ((at.long(), False), (at[:, 1:], False), (at, True)):  # indices, a short mask, both
        with pytest.raises(ValueError, match="bool mask"):
            model(batch.input_ids, at=wrong, last_only=last_only)


@pytest.mark.slow
def test_loss_decreases_when_overfitting_one_example():
    model = random_omni(tiny_config(), seed=4).train()
    model.requires_grad_(True)
    batch = collate_batch([build_example(Task.A1A2, [7, 8, 9], torch.randint(0, 4096, (7, 3)),
                                         audio_features=features(4))])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        optimizer.zero_grad()
        value = loss(model, batch)
        value.backward()
        optimizer.step()
        history.append(float(value.detach()))
    assert all(np.isfinite(history))
    print("loss history", [round(h, 2) for h in history[::5]], round(history[-1], 3))
    assert history[-1] < 0.2 * history[0], history


def test_bucketing_keeps_padding_small():
    rng = random.Random(0)
    examples = [build_example(Task.T1T2, [5] * rng.randrange(1, 120), question_ids=[3] * rng.randrange(1, 40))
                for _ in range(200)]
    batches = bucket_by_length(examples, max_tokens=1024)
    assert sorted(id(e) for b in batches for e in b) == sorted(id(e) for e in examples)
    assert all(len(b) * max(e.length for e in b) <= 1024 for b in batches)
    shuffled = examples[:]
    rng.shuffle(shuffled)
    sizes = [len(b) for b in batches]
    naive, start = [], 0
    for size in sizes:
        naive.append(shuffled[start : start + size])
        start += size
    bucketed, unsorted = padding_fraction(batches), padding_fraction(naive)
    print(f"padding fraction: bucketed {bucketed:.3f}, same batch sizes unsorted {unsorted:.3f}")
    assert bucketed < 0.1 and bucketed < unsorted / 4
    assert [len(b) for b in bucket_by_length(examples[:10], 10**6, max_batch_size=4)] == [4, 4, 2]


# ------------------------------------------------------------------------------- readers


def wav_bytes(seconds, seed):
    buffer = io.BytesIO()
    sf.write(buffer, speech_like(seconds, seed=seed), 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_voiceassistant_parquet_records_collate_and_cache(tmp_path, omni):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    frames = [torch.randint(0, 4096, (7, n), generator=torch.Generator().manual_seed(n)) for n in (3, 5)]
    table = pa.table({
        "split_name": ["identity", "identity"],
        "index": [0, 1],
        "round": [0, 0],
        "question": ["What is your name?", "How are you feeling today?"],
        "question_audio": [{"bytes": wav_bytes(0.5, 0), "path": "q0.wav"}, {"bytes": wav_bytes(0.8, 1), "path": None}],
        "answer": ["My name is Omni.", "I feel great."],
        "answer_snac": [tk.layers_to_answer_snac(f) for f in frames],
    })
    path = tmp_path / "va.parquet"
    pq.write_table(table, path)
    records = list(read_voiceassistant(path))
    assert [r.task for r in records] == [Task.A1A2, Task.A1A2]
    assert torch.equal(records[1].answer_layers, frames[1]) and records[0].answer_text == "My name is Omni."
    assert records[0].question_audio.dtype == np.float32 and len(records[0].question_audio) == 8000
    cache = FeatureCache(omni.encode_audio, tmp_path / "features", namespace="tiny")
    first = [collate_record(r, omni.tokenizer, cache) for r in records]
    assert (cache.hits, cache.misses) == (0, 2)
    second = [collate_record(r, omni.tokenizer, cache) for r in read_voiceassistant(tmp_path)]
    assert (cache.hits, cache.misses) == (2, 2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.audio_features, b.audio_features)
    lazy = FeatureCache(omni.encode_audio, tmp_path / "features", namespace="tiny", lazy=True)
    held = [collate_record(r, omni.tokenizer, lazy) for r in records]
    assert (lazy.hits, lazy.misses) == (2, 0) and all(isinstance(e.audio_features, CachedFeatures) for e in held)
    eager_batch, lazy_batch = collate_batch(first), collate_batch(held)
    assert torch.equal(eager_batch.audio_features, lazy_batch.audio_features)
    assert torch.equal(eager_batch.input_ids, lazy_batch.input_ids)
    assert eager_batch.audio_lengths == lazy_batch.audio_lengths
    damaged = held[0].audio_features.path
    damaged.write_bytes(damaged.read_bytes()[:100])  # e.g. a full disk: the entry is computed again
    with pytest.raises(MiniOmniError, match="delete that file"):
        held[0].audio_features.load()
    again = collate_record(records[0], omni.tokenizer, lazy)
    assert lazy.misses == 1
    assert torch.equal(collate_batch([again]).audio_features[0], eager_batch.audio_features[0, :26])
    ex = first[0]
    assert ex.audio_length == 26 and ex.audio_features.shape == (26, 32)  # int(500 ms / 20) + 1
    answer_ids = omni.encode_text("My name is Omni.")
    P = ex.prompt_length
    assert ex.input_ids[7, P : P + len(answer_ids) + 1].tolist() == answer_ids + [tk.EOT]
    fresh = omni.encode_audio(records[0].question_audio)[0]
    assert torch.allclose(ex.audio_features, fresh, atol=1e-2)  # float16 on disk
    text_records = list(read_voiceassistant(path, task="T1T2"))
    assert text_records[0].question_text == "What is your name?" and text_records[0].answer_layers is None
    t1a2 = collate_record(next(read_voiceassistant(path, task=Task.T1A2)), omni.tokenizer)
    assert t1a2.input_ids[7, 1 : 1 + len(omni.encode_text("What is your name?"))].tolist() == \
        omni.encode_text("What is your name?")


def test_librispeech_folder_and_jsonl(tmp_path, omni):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "19" / "198"
    chapter.mkdir(parents=True)
    for index, seconds in enumerate((0.4, 0.7)):
        sf.write(chapter / f"19-198-000{index}.flac", speech_like(seconds, seed=index), 16000)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 HOW ARE YOU\n")
    records = list(read_librispeech(tmp_path / "LibriSpeech" / "dev-clean"))
    assert [(r.task, r.answer_text, len(r.question_audio)) for r in records] == [
        (Task.ASR, "HELLO WORLD", 6400), (Task.ASR, "HOW ARE YOU", 11200)]
    ex = collate_record(records[0], omni.tokenizer, FeatureCache(omni.encode_audio))
    assert ex.input_ids[7, ex.prompt_length - 1] == tk.ASR and ex.audio_length == 21

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in [
        {"question": "What is your name?", "answer": "Omni."},
        {"instruction": "Say hi", "output": "Hi!"},
    ]) + "\n")
    pairs = list(read_jsonl(jsonl))
    assert [(r.task, r.question_text, r.answer_text) for r in pairs] == [
        (Task.T1T2, "What is your name?", "Omni."), (Task.T1T2, "Say hi", "Hi!")]
    ex = collate_record(pairs[1], omni.tokenizer)
    q, a = omni.encode_text("Say hi"), omni.encode_text("Hi!")
    assert ex.input_ids[7].tolist() == [tk.INPUT_T, *q, tk.EOT, tk.ANSWER_T, *a, tk.EOT]


def test_record_errors():
    with pytest.raises(ValueError):
        build_example(Task.T1A2, [7], None, question_ids=[3])  # speech answer without frames
    with pytest.raises(ValueError):
        build_example(Task.T1T2, [], question_ids=[3])
    with pytest.raises(ValueError):
        build_example(Task.ASR, [7])  # no features
    with pytest.raises(ValueError):
        collate_record(Record(Task.ASR, "x", question_audio=np.zeros(10, np.float32)), lambda s: [1])


def test_streaming_without_datasets_says_what_to_do(monkeypatch):
    import sys

    from miniomni.data import stream_voiceassistant
    from miniomni.errors import MiniOmniError

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(MiniOmniError, match="pip install datasets"):
        next(stream_voiceassistant())
