"""Decoding rules (docs/decoding.md) on a scripted model, and the real tiny model end to end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from miniomni import tokens as tk
from miniomni.errors import ConfigError
from miniomni.generate import DecodeInput, SamplingOptions, decode, max_new_tokens_for, sample
from miniomni.models.llm import KVCache
from miniomni.tokens import Task


class ScriptedModel:
    """Plays back chosen tokens (as one-hot logits) and records the ids fed at every decode step.

    script[i] = (text per row, audio per row) returned after the prompt (i = 0) and after the
    i-th decode step. The "hidden state" it returns carries (script index, row) so the head
    calls can answer for the right step and row.
    """

    def __init__(self, script, prompt_length):
        self.script = script
        self.prompt_length = prompt_length
        self.fed: list[torch.Tensor] = []
        self.llm = SimpleNamespace(embed=SimpleNamespace(weight=torch.empty(0)))

    def new_cache(self, rows, max_length=None):
        self.max_length = max_length
        return KVCache(keys=[], values=[])

    def hidden_states(self, streams, positions, cache, audio_features=None, audio_lengths=None, kv_len=None):
        if int(positions[0]) >= self.prompt_length:
            self.fed.append(streams.clone())
        rows, _, length = streams.shape
        hidden = torch.zeros(rows, length, 2)
        hidden[..., 0] = min(len(self.fed), len(self.script) - 1)
        hidden[..., 1] = torch.arange(rows).view(rows, 1).float()
        return hidden

    def hidden_states_steps(self, *args, **kwargs):
        return self.hidden_states(*args, **kwargs)
        yield  # a generator with one unit of work, as the real model's

    def _entry(self, hidden):
        step, row = hidden.reshape(-1, 2)[-1].tolist()
        return self.script[int(step)], int(row)

    def text_logits(self, hidden):
        (texts, _), row = self._entry(hidden)
        logits = torch.zeros(1, tk.PADDED_TEXT_VOCAB_SIZE)
        logits[0, texts[row]] = 1.0
        return logits

    def audio_logits(self, hidden):
        (_, audios), row = self._entry(hidden)
        logits = torch.zeros(7, tk.PADDED_AUDIO_VOCAB_SIZE)
        for layer, token in enumerate(audios[row]):
            logits[layer, token] = 1.0
        return logits


def batch_input(frames=2):
    prompts = torch.stack([tk.audio_prompt(frames, Task.A1A2), tk.audio_prompt(frames, Task.A1T2)])
    return DecodeInput(Task.A1A2_BATCH, prompts, torch.zeros(2, frames, 4), [frames, frames])


def test_batch_parallel_takes_audio_from_row0_text_from_row1_and_feeds_both():
    audio0 = [[10 + s + layer for layer in range(7)] for s in range(4)]
    audio1 = [[900] * 7] * 4
    script = [((5, 100 + s), (audio0[s], audio1[s])) for s in range(4)]
    inputs = batch_input()
    model = ScriptedModel(script, inputs.prompt_length)
    steps = list(decode(model, inputs, max_new_tokens=4))
    assert [s.text for s in steps] == [100, 101, 102, 103]
    assert [s.audio for s in steps] == audio0
    # fed[s] holds the tokens sampled at step s, fed back.
    for s in range(3):
        fed = model.fed[s]
        assert fed.shape == (2, 8, 1)
        assert fed[0, :7, 0].tolist() == [tk.layershift(t, layer) for layer, t in enumerate(audio0[s])]
        assert fed[1, :7, 0].tolist() == [tk.layershift(tk.PAD_A, layer) for layer in range(7)]
        assert fed[:, 7, 0].tolist() == [100 + s, 100 + s]


def test_speech_output_stops_at_layer6_eoa_and_pads_text_after_eot():
    normal = [1] * 7
    eoa_last = [1] * 6 + [tk.EOA]
    script = [
        ((tk.EOT,), (eoa_last,)),  # step 0: neither check applies (reference quirk)
        ((50,), (normal,)),
        ((tk.EOT,), (normal,)),  # text ends here
        ((77,), (normal,)),  # sampled but replaced by _pad_t
        ((78,), (eoa_last,)),  # stop, inclusive
        ((79,), (normal,)),
    ]
    inputs = DecodeInput(Task.T1A2, tk.text_prompt([3, 4], Task.T1A2).unsqueeze(0))
    model = ScriptedModel(script, inputs.prompt_length)
    steps = list(decode(model, inputs))
    assert [s.text for s in steps] == [tk.EOT, 50, tk.EOT, tk.PAD_T, tk.PAD_T]
    assert steps[-1].audio == eoa_last and len(steps) == 5
    fed_text = [int(f[0, 7, 0]) for f in model.fed]
    assert fed_text == [tk.EOT, 50, tk.EOT, tk.PAD_T]  # _eot is fed once, then _pad_t
    fed_audio = [f[0, :7, 0].tolist() for f in model.fed]
    assert fed_audio[1] == [tk.layershift(1, layer) for layer in range(7)]


@pytest.mark.parametrize("task", [Task.T1T2, Task.A1T2, Task.ASR])
def test_text_output_feeds_pad_a_and_stops_at_eot(task):
    if task.audio_input:
        inputs = DecodeInput(task, tk.audio_prompt(2, task).unsqueeze(0), torch.zeros(1, 2, 4), [2])
    else:
        inputs = DecodeInput(task, tk.text_prompt([3], task).unsqueeze(0))
    script = [((7,), ([1] * 7,)), ((8,), ([1] * 7,)), ((tk.EOT,), ([1] * 7,)), ((9,), ([1] * 7,))]
    model = ScriptedModel(script, inputs.prompt_length)
    steps = list(decode(model, inputs))
    assert [s.text for s in steps] == [7, 8, tk.EOT]
    assert all(s.audio is None for s in steps)
    for fed in model.fed:
        assert fed[0, :7, 0].tolist() == [tk.layershift(tk.PAD_A, layer) for layer in range(7)]


def test_length_cap_and_max_new_tokens():
    assert max_new_tokens_for(100, None) == 1948
    assert max_new_tokens_for(100, 5000) == 1948
    assert max_new_tokens_for(100, 7) == 7
    with pytest.raises(ConfigError):
        max_new_tokens_for(100, 0)
    with pytest.raises(ConfigError):
        max_new_tokens_for(2048, None)
    inputs = DecodeInput(Task.T1A2, tk.text_prompt([3], Task.T1A2).unsqueeze(0))
    model = ScriptedModel([((7,), ([1] * 7,))], inputs.prompt_length)
    assert len(list(decode(model, inputs, max_new_tokens=6))) == 6
    assert model.max_length == inputs.prompt_length + 6


def test_sampler_orders_and_limits():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample(logits, SamplingOptions()).tolist() == [1]
    assert sample(logits, SamplingOptions(temperature=5.0, top_k=1)).tolist() == [1]
    opts = SamplingOptions(temperature=10.0, top_k=2, seed=0)
    gen = opts.generator(torch.device("cpu"))
    draws = {int(sample(logits, opts, gen)) for _ in range(200)}
    assert draws == {1, 3}
    opts = SamplingOptions(temperature=1.0, top_p=0.01, seed=0)
    gen = opts.generator(torch.device("cpu"))
    assert {int(sample(logits, opts, gen)) for _ in range(50)} == {1}
    with pytest.raises(ConfigError):
        SamplingOptions(top_p=0.0)


# ------------------------------------------------------------------------ real tiny model


def reference_loop(model, inputs: DecodeInput, steps: int):
    """The decoding rules recomputed from scratch each step (no KV cache): an independent check."""
    task = inputs.task
    sequence = inputs.prompts.clone()
    rows = sequence.shape[0]
    text_row = 1 if task == Task.A1A2_BATCH else 0
    out_text, out_audio, text_ended = [], [], False
    for index in range(steps):
        text_logits, audio_logits = model(sequence, audio_features=inputs.audio_features,
                                          audio_lengths=inputs.audio_lengths or None)
        text = tk.PAD_T if (task.audio_output and text_ended) else int(text_logits[text_row, -1].argmax())
        audio = audio_logits[0, -1].argmax(-1).tolist() if task.audio_output else None
        out_text.append(text)
        out_audio.append(audio)
        if index > 0:
            if task.audio_output and audio[6] == tk.EOA:
                break
            if text == tk.EOT:
                if not task.audio_output:
                    break
                text_ended = True
        column = torch.empty(rows, 8, 1, dtype=torch.long)
        for row in range(rows):
            for layer in range(7):
                local = audio[layer] if (task.audio_output and row == 0) else tk.PAD_A
                column[row, layer, 0] = tk.layershift(local, layer)
            column[row, 7, 0] = text
        sequence = torch.cat([sequence, column], dim=-1)
    return out_text, out_audio


@pytest.mark.parametrize("task", ["A1A2-batch", "A1A2", "asr", "T1A2", "T1T2"])
def test_cached_decode_equals_uncached_reference(omni, question_wav, task):
    parsed = Task.parse(task)
    source = dict(audio=question_wav) if parsed.audio_input else dict(text="What is your name?")
    inputs = omni.prepare(parsed, **source)
    steps = list(decode(omni.model, inputs, max_new_tokens=12))
    with torch.inference_mode():
        ref_text, ref_audio = reference_loop(omni.model, inputs, 12)
    assert [s.text for s in steps] == ref_text
    assert [s.audio for s in steps] == ref_audio


def test_greedy_is_bit_identical_across_runs(omni, question_wav):
    first = omni.generate(audio=question_wav, max_new_tokens=20)
    second = omni.generate(audio=question_wav, max_new_tokens=20)
    assert first.task is Task.A1A2_BATCH
    assert first.tokens_json() == second.tokens_json()
    assert first.audio is not None and (first.audio == second.audio).all()
    frames = tk.undelay(first.audio_tokens).shape[1]
    assert frames == 20 - 8 + 1  # frames exist from the 8th sampled step on
    assert len(first.audio) == frames * 2048


def test_seeded_sampling_repeats_and_seeds_differ(omni):
    kwargs = dict(text="How are you feeling today?", task="T1T2", max_new_tokens=15, temperature=1.0)
    a = omni.generate(seed=1, **kwargs).text_tokens
    b = omni.generate(seed=1, **kwargs).text_tokens
    c = omni.generate(seed=2, **kwargs).text_tokens
    assert a == b and a != c


def test_text_is_cut_at_eot_and_specials_dropped(omni):
    ids = omni.encode_text("What is your name?")
    tokens = ids + [tk.PAD_T] + [tk.EOT] + omni.encode_text("garbage after the end")
    assert omni.decode_text(tokens) == "What is your name?"


def test_answer_text_follows_the_reference():
    from miniomni.generate import answer_text_ids

    # Speech: cut at the first _eot, wherever it is; the step that emitted _eoa is dropped.
    assert answer_text_ids(Task.T1A2, [40, 41, tk.EOT, tk.PAD_T]) == [40, 41]
    assert answer_text_ids(Task.T1A2, [40, 41, 42], ended_on_eoa=True) == [40, 41]
    assert answer_text_ids(Task.A1A2_BATCH, [tk.EOT, 50]) == []
    # Text: an _eot sampled from the prompt is not a stop; later ones are.
    assert answer_text_ids(Task.T1T2, [tk.EOT, 50, 51, tk.EOT]) == [50, 51]
    assert answer_text_ids(Task.ASR, [50, tk.EOT, 51]) == [50]


def test_eoa_step_text_is_not_part_of_the_answer(omni):
    script = [((40,), ([1] * 7,)), ((41,), ([1] * 7,)), ((42,), ([1] * 6 + [tk.EOA],))]
    inputs = DecodeInput(Task.T1A2, tk.text_prompt([3], Task.T1A2).unsqueeze(0))
    steps = list(decode(ScriptedModel(script, inputs.prompt_length), inputs))
    assert [s.end for s in steps] == [None, None, "eoa"]
    expected = omni.tokenizer.decode([40, 41]).strip()
    assert omni.decode_text([s.text for s in steps], Task.T1A2, ended_on_eoa=True) == expected


def test_embedding_is_the_mean_of_eight_streams_with_whisper_at_1_to_T(omni):
    model = omni.model
    frames = 3
    prompt = tk.audio_prompt(frames, Task.A1A2).unsqueeze(0)
    features = torch.randn(1, frames, model.config.whisper_adapter_dim)
    with torch.inference_mode():
        got = model.embed_streams(prompt, features, [frames])
        table = model.llm.embed.weight
        adapted = model.adapter(features)[0]
        expected = torch.zeros_like(got[0])
        for position in range(prompt.shape[-1]):
            vectors = [table[prompt[0, stream, position]] for stream in range(8)]
            if 1 <= position <= frames:
                vectors[:7] = [adapted[position - 1]] * 7  # the text stream keeps its own
            expected[position] = sum(vectors) / 8
    assert torch.allclose(got[0], expected, atol=1e-6)
