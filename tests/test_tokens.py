"""Token layout: ids, prompts (every task, token by token, against docs/decoding.md), SNAC frame round trips."""

import pytest
import torch

from miniomni import tokens as tk
from miniomni.tokens import Task


def test_special_ids_match_spec():
    assert (tk.EOT, tk.PAD_T, tk.INPUT_T, tk.ANSWER_T, tk.ASR) == (151936, 151937, 151938, 151939, 151940)
    assert (tk.EOA, tk.PAD_A, tk.INPUT_A, tk.ANSWER_A, tk.SPLIT) == (4096, 4097, 4098, 4099, 4100)
    assert tk.VOCAB_SIZE == 181120
    assert tk.layershift(0, 0) == 152000
    assert tk.layershift(4099, 6) == 4099 + 152000 + 4160 * 6
    assert tk.unshift(tk.layershift(123, 4), 4) == 123


def a(local, layer):  # spelled out here on purpose: the documented formula, not the package's
    return local + 152000 + 4160 * layer


@pytest.mark.parametrize(
    "task, last_audio, last_text",
    [
        (Task.A1A2, 4099, 151939),  # _answer_a, _answer_t
        (Task.A1A2_BATCH, 4099, 151939),
        (Task.A1T2, 4097, 151939),  # _pad_a, _answer_t
        (Task.ASR, 4097, 151940),  # _pad_a, _asr
    ],
)
def test_audio_prompts_equal_spec_table(task, last_audio, last_text):
    frames = 5
    prompt = tk.audio_prompt(frames, task)
    assert prompt.shape == (8, frames + 3)
    for layer in range(7):
        expected = [a(4098, layer)] + [a(4097, layer)] * frames + [a(4096, layer), a(last_audio, layer)]
        assert prompt[layer].tolist() == expected
    assert prompt[7].tolist() == [151938] + [151937] * frames + [151936, last_text]


def test_text_prompts_equal_spec_table():
    ids = [11, 22, 33]
    t1a2 = tk.text_prompt(ids, Task.T1A2)
    t1t2 = tk.text_prompt(ids, Task.T1T2)
    for layer in range(7):
        assert t1a2[layer].tolist() == [a(4097, layer)] * 5 + [a(4099, layer)]
        assert t1t2[layer].tolist() == [a(4097, layer)] * 6
    assert t1a2[7].tolist() == [151938, 11, 22, 33, 151936, 151939]
    assert t1t2[7].tolist() == [151938, 11, 22, 33, 151936, 151939]


def test_prompt_task_mismatch_is_refused():
    with pytest.raises(ValueError):
        tk.text_prompt([1], Task.A1A2)
    with pytest.raises(ValueError):
        tk.audio_prompt(3, Task.T1T2)


def test_task_parse_accepts_values_and_aliases():
    assert Task.parse("A1A2-batch") is Task.A1A2_BATCH
    assert Task.parse("ASR") is Task.ASR
    assert Task.parse("A1T1") is Task.ASR
    with pytest.raises(ValueError, match="choose one of"):
        Task.parse("talk")


def random_codes(frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 4096, (1, frames * r), generator=g) for r in (1, 2, 4)]


def test_codes_layers_depth_first_order():
    codes = random_codes(3)
    layers = tk.codes_to_layers(codes)
    c0, c1, c2 = (c[0] for c in codes)
    for k in range(3):
        assert layers[:, k].tolist() == [
            c0[k], c1[2 * k], c2[4 * k], c2[4 * k + 1], c1[2 * k + 1], c2[4 * k + 2], c2[4 * k + 3]
        ]
    back = tk.layers_to_codes(layers)
    for original, restored in zip(codes, back, strict=True):
        assert torch.equal(original, restored)


def test_delay_undelay_round_trip_and_first_frame_after_eight_steps():
    layers = tk.codes_to_layers(random_codes(4, seed=1))
    streams = tk.delay(layers)
    assert streams.shape == (7, 4 + 8)
    for i in range(7):
        assert streams[i, : i + 1].tolist() == [tk.PAD_A] * (i + 1)
        assert streams[i, i + 1 + 4] == tk.EOA
    assert torch.equal(tk.undelay(streams.tolist()), layers)
    # After 8 sampled steps (index 0..7) exactly one complete frame exists.
    assert tk.undelay(streams[:, :8].tolist()).shape == (7, 1)
    assert tk.undelay(streams[:, :7].tolist()).shape == (7, 0)


def test_undelay_stops_at_special_ids():
    layers = tk.codes_to_layers(random_codes(3, seed=2))
    streams = tk.delay(layers, end=None).tolist()
    streams[2][2 + 1 + 1] = tk.EOA  # frame 1 of layer 2 is a special id
    assert tk.undelay(streams).shape == (7, 1)


def test_answer_snac_round_trip_and_errors():
    layers = tk.codes_to_layers(random_codes(2, seed=3))
    text = tk.layers_to_answer_snac(layers)
    assert text.startswith("# ") and text.count("#") == 2 and len(text.split()) == 16
    assert torch.equal(tk.answer_snac_to_layers(text), layers)
    with pytest.raises(ValueError, match="start with"):
        tk.answer_snac_to_layers("1 2 3")
    with pytest.raises(ValueError, match="expected 7"):
        tk.answer_snac_to_layers("# 1 2 3")
    with pytest.raises(ValueError, match="outside"):
        tk.answer_snac_to_layers("# 1 2 3 4 5 6 4096")
