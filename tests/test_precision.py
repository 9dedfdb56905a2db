"""The precision plan: what each kind of CPU gets, the AVX2 limit, overrides and the codec check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import miniomni
from miniomni import int8act, precision
from miniomni.precision import AVX2_LIMIT, Machine, Plan, Precision, choose, confirm_codec
from miniomni.quantize import Int8Linear

CPU = torch.device("cpu")
AVX2_ONLY = Machine(capability="AVX2", native_bfloat16=False, vnni=False)
BF16_CPU = Machine(capability="AVX512", native_bfloat16=True, vnni=True)


def as_names(plan: Plan) -> list[str]:
    return [plan.weights, *(str(d).removeprefix("torch.") for d in (plan.activations, plan.encoder, plan.codec))]


@pytest.mark.parametrize(("cpu", "expected"), [
    (AVX2_ONLY, ["int8", "float32", "float32", "float32"]),
    (BF16_CPU, ["int8", "bfloat16", "bfloat16", "bfloat16"]),
])
def test_int8_plan_follows_the_cpu(monkeypatch, cpu, expected):
    monkeypatch.setattr(precision, "machine", lambda: cpu)
    plan = choose(CPU, Precision("int8"))
    assert as_names(plan) == expected
    assert set(plan.chosen) == {"activations", "encoder", "codec", "int8_activations"}
    assert cpu.describe() in plan.describe()


@pytest.mark.skipif(not int8act.available(), reason="fbgemm's int8 products need an x86 PyTorch")
def test_int8_activations_by_default_only_with_vnni(monkeypatch):
    monkeypatch.setattr(precision, "machine", lambda: BF16_CPU)
    assert choose(CPU, Precision("int8")).int8_activations == 8
    assert "8-bit activations" in choose(CPU, Precision("int8")).describe()
    assert choose(CPU, Precision("int8", int8_activations="off")).int8_activations == 0
    assert choose(CPU, Precision(None)).int8_activations == 0  # float weights: nothing to do with int8
    monkeypatch.setattr(precision, "machine", lambda: AVX2_ONLY)
    assert choose(CPU, Precision("int8")).int8_activations == 0  # 7-bit activations cost too much to be a default
    assert choose(CPU, Precision("int8", int8_activations="on")).int8_activations == 7
    with pytest.raises(miniomni.MiniOmniError, match="int8_activations"):
        choose(CPU, Precision("int8", int8_activations="yes"))


@pytest.mark.parametrize("cpu", [AVX2_ONLY, BF16_CPU])
def test_float_weights_stay_faithful_and_overrides_win(monkeypatch, cpu):
    monkeypatch.setattr(precision, "machine", lambda: cpu)
    assert as_names(choose(CPU, Precision(None))) == ["float32"] * 4
    asked = choose(CPU, Precision("int8", "bfloat16", codec="float32", int8_activations="off"))
    assert asked.activations == torch.bfloat16 and asked.codec == torch.float32 and asked.chosen == ("encoder",)
    # Whisper follows the activations only where bfloat16 is fast.
    assert asked.encoder == (torch.bfloat16 if cpu.native_bfloat16 else torch.float32)
    with pytest.raises(miniomni.MiniOmniError, match="float32 or bfloat16"):
        choose(CPU, Precision(None, "float16"))


def test_the_avx2_limit_gives_the_avx2_plan():
    """Limited to AVX2 (precision.AVX2_LIMIT) this machine plans as an AVX2-only CPU."""
    code = ("import json, torch; from miniomni.precision import Precision, choose, machine; "
            "p = choose(torch.device('cpu'), Precision('int8')); print(json.dumps([machine().capability, "
            "machine().native_bfloat16, str(p.activations), str(p.codec), p.int8_activations]))")
    env = {**os.environ, **AVX2_LIMIT}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    capability, native, activations, codec, bits = json.loads(out.stdout)
    assert capability in ("AVX2", "DEFAULT")
    assert native is False
    assert activations == codec == "torch.float32"
    assert bits == 0  # fbgemm limited to AVX2 has no VNNI: weight-only kernels


def test_int8_weights_with_float32_activations(checkpoint_dir, question_wav, omni):
    quantized = miniomni.load(checkpoint_dir, device="cpu", quantize="int8", dtype="float32")
    assert quantized.dtype == torch.float32 and quantized.plan.codec == torch.float32
    head = quantized.model.llm.lm_head
    assert isinstance(head, Int8Linear) and head.scales.dtype == torch.bfloat16  # .to(float32) keeps the kernel's
    inputs = omni.prepare("T1T2", text="What is your name?")
    with torch.inference_mode():
        reference = omni.model(inputs.prompts, last_only=True)[0].float()
        approx = quantized.model(inputs.prompts, last_only=True)[0]
    assert approx.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(reference.flatten(), approx.flatten(), dim=0) > 0.99
    *_, done = quantized.stream(audio=question_wav, max_new_tokens=12)
    assert done.timings.steps == 12 and done.timings.audio_seconds > 0


def test_confirm_codec_keeps_asked_precisions_and_switches_on_a_clear_difference(omni, monkeypatch):
    codec = omni.codec
    costs = {torch.float32: 10.0, torch.bfloat16: 200.0}  # as an AVX2-only CPU measures SNAC
    monkeypatch.setattr(type(codec), "stream_ms_per_frame", lambda self, frames=2: costs[self.stream_dtype])
    chose_bf16 = Plan("int8", torch.bfloat16, torch.bfloat16, torch.bfloat16, chosen=("codec",), why="test")
    try:
        confirmed = confirm_codec(codec, chose_bf16)
        assert confirmed.codec == torch.float32 and codec.stream_dtype == torch.float32
        assert "float32 10 ms" in confirmed.describe() and "bfloat16 200 ms" in confirmed.describe()
        asked = Plan("int8", torch.bfloat16, torch.bfloat16, torch.bfloat16, chosen=(), why="")
        assert confirm_codec(codec, asked) is asked  # asked for: not second-guessed
        costs[torch.bfloat16] = 8.0  # a small difference does not overturn the plan
        chose_f32 = Plan("int8", torch.float32, torch.float32, torch.float32, chosen=("codec",), why="test")
        assert confirm_codec(codec, chose_f32).codec == torch.float32
    finally:
        codec.set_stream_dtype(torch.float32)


def test_codec_measures_itself(omni):
    assert omni.codec.stream_ms_per_frame() > 0


def test_the_start_up_advice_is_true_on_the_machine(monkeypatch):
    import argparse

    from miniomni.cli import _advice

    args = argparse.Namespace(device="cpu")
    monkeypatch.setattr(precision, "machine", lambda: AVX2_ONLY)
    assert "--quantize int8" in _advice(choose(CPU, Precision(None)), args)
    assert _advice(choose(CPU, Precision("int8", codec="bfloat16")), args) == "leave --codec-dtype at auto"
    if int8act.available():
        assert "--int8-activations on" in _advice(choose(CPU, Precision("int8")), args)
    monkeypatch.setattr(precision, "machine", lambda: BF16_CPU)
    assert _advice(choose(CPU, Precision("int8", "float32")), args) == "leave --dtype at auto"
    assert "fastest precision plan" in _advice(choose(CPU, Precision("int8")), args)
