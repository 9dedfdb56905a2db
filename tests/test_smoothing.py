"""Smoothing before int8 activations: the same function in float, outlier channels in float, stored with the weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_omni, tiny_config
from torch import nn

from miniomni import int8act
from miniomni.calibration import calibration_ids
from miniomni.checkpoints import convert_model_state
from miniomni.int8act import Int8ActLinear, use_int8_activations
from miniomni.quantize import Int8Linear, attach_outliers, quantize_int8
from miniomni.smoothing import smooth_llm, smoothed_blocks

needs_fbgemm = pytest.mark.skipif(not int8act.available(), reason="fbgemm's int8 products need an x86 PyTorch")


def llm_with_outliers(seed: int = 0) -> nn.Module:
    """A tiny random LLM whose hidden states have a few channels far larger than the rest, as trained ones do."""
    model = random_omni(tiny_config(), seed=seed)
    with torch.no_grad():
        model.llm.embed.weight[:, [3, 17, 40]] *= 30.0
        for block in model.llm.layers:
            block.mlp_norm.weight[[5, 50]] *= 20.0
    return model.llm.float().eval()


def ids(seed: int = 1, length: int = 48) -> torch.Tensor:
    return torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(seed))


def test_smoothed_float_model_is_the_same_function():
    llm = llm_with_outliers()
    smoothed = copy.deepcopy(llm)
    smooth_llm(smoothed, ids(1))
    after = dict(smoothed.named_parameters())
    changed = [name for name, p in llm.named_parameters() if not torch.equal(p, after[name])]
    assert any("attn_norm" in n for n in changed) and any("mlp.up" in n for n in changed)
    assert any("attn.out" in n for n in changed) and any("attn.qkv.bias" in n for n in changed)
    with torch.no_grad():
        before, after = llm(ids(2)), smoothed(ids(2))
    # Float rounding only: the same function in real arithmetic.
    assert (after - before).abs().max() <= 1e-4 * before.abs().max(), float((after - before).abs().max())


def test_smoothing_from_the_state_dict_equals_smoothing_the_model():
    llm = llm_with_outliers()
    state = {"llm." + k: v for k, v in llm.state_dict().items()}
    calibration = ids(3)
    from_state = dict(smoothed_blocks(state, llm.config, calibration, outliers=4))
    model = copy.deepcopy(llm)
    outliers = smooth_llm(model, calibration, outliers=4)
    for key, tensor in model.state_dict().items():
        if key.startswith("layers."):
            torch.testing.assert_close(from_state["llm." + key], tensor, rtol=1e-5, atol=1e-6)
    for key, channels in outliers.items():
        assert torch.equal(from_state["llm." + key], channels), key
        assert len(channels) == 4
    assert torch.equal(outliers["layers.0.mlp.gate.outliers"], outliers["layers.0.mlp.up.outliers"])


@needs_fbgemm
def test_outlier_channels_in_float_cut_the_error_and_keep_rows_apart():
    torch.manual_seed(0)
    linear = nn.Linear(96, 160)
    x = torch.randn(16, 96)
    x[:, [7, 30, 31]] *= 40.0  # the same few channels large in every row
    plain = Int8Linear.from_linear(linear)
    split = Int8Linear.from_linear(linear)
    split.outliers = torch.tensor([7, 30, 31])
    with torch.no_grad():
        reference = linear(x)

    def error(product: Int8ActLinear) -> float:
        return float(((product(x) - reference).norm(dim=1) / reference.norm(dim=1)).max())

    assert error(Int8ActLinear([split], 8)) < 0.5 * error(Int8ActLinear([plain], 8))
    product = Int8ActLinear([split], 8)
    alone = torch.cat([product(x[i : i + 1]) for i in range(16)])
    for rows in (1, 2, 5, 16):
        assert torch.equal(product(x[:rows]), alone[:rows]), rows
    # A prompt's rows (more than PROMPT_ROWS) add the outlier channels in one GEMM: the same sums, in another order.
    prompt = x.repeat(int8act.PROMPT_ROWS // 16 + 1, 1)
    assert torch.allclose(product(prompt)[:16], alone, rtol=1e-5, atol=1e-4)


@needs_fbgemm
def test_int8_conversion_with_calibration_stores_outliers_that_load_back(checkpoint_dir):
    from miniomni.checkpoints import read_checkpoint

    parts = read_checkpoint(checkpoint_dir)
    calibration = calibration_ids(parts.tokenizer_json, max_tokens=64)
    assert calibration.shape[0] == 1 and 8 <= calibration.shape[1] <= 64
    state = convert_model_state(parts.model_state, parts.config, torch.bfloat16, "int8", calibration=calibration)
    keys = [k for k in state if k.endswith(".outliers")]
    assert len(keys) == 5 * parts.config.n_layer  # qkv, out, gate, up, down in every block
    from miniomni.models.omni import OmniModel

    with torch.device("meta"):
        model = OmniModel(parts.config)
        quantize_int8(model.llm)
    rest = attach_outliers(model, state)
    assert not any(k.endswith(".outliers") for k in rest)
    assert torch.equal(model.llm.layers[1].mlp.down.outliers, state["llm.layers.1.mlp.down.outliers"])
    plain = convert_model_state(parts.model_state, parts.config, torch.bfloat16, "int8")
    assert not any(k.endswith(".outliers") for k in plain) and set(rest) == set(plain)


@needs_fbgemm
def test_smoothing_with_outliers_brings_int8_activations_closer_to_float():
    llm = llm_with_outliers(seed=5)
    calibration, evaluation = ids(7, 64), ids(8, 64)
    with torch.no_grad():
        reference = llm(evaluation)

    def int8_error(model: nn.Module) -> float:
        quantized = quantize_int8(copy.deepcopy(model))
        use_int8_activations(quantized, 8)
        with torch.no_grad():
            return float((quantized(evaluation) - reference).norm() / reference.norm())

    smoothed = copy.deepcopy(llm)
    outliers = smooth_llm(smoothed, calibration, outliers=4)
    quantized = quantize_int8(copy.deepcopy(smoothed))
    attach_outliers(quantized, outliers)
    use_int8_activations(quantized, 8)
    with torch.no_grad():
        improved = float((quantized(evaluation) - reference).norm() / reference.norm())
    assert improved < 0.7 * int8_error(llm), (improved, int8_error(llm))


@needs_fbgemm
def test_int8_loads_are_calibrated_and_old_bundles_still_load(checkpoint_dir, tmp_path, question_wav):
    import miniomni
    from miniomni.checkpoints import read_checkpoint, write_bundle

    omni = miniomni.load(checkpoint_dir, device="cpu", quantize="int8", int8_activations="on")
    assert omni.plan.calibrated and "KL" in omni.plan.quality()
    down = omni.model.llm.layers[0].mlp.down
    assert down.outliers is not None and down.int8_activations.outliers is not None
    bundle = write_bundle(read_checkpoint(checkpoint_dir), tmp_path / "int8.safetensors", quantize="int8")
    from_bundle = miniomni.load(bundle, device="cpu", int8_activations="on")
    assert from_bundle.plan.calibrated
    assert torch.equal(from_bundle.model.llm.layers[0].mlp.down.outliers, down.outliers)
    question = {"audio": str(question_wav), "max_new_tokens": 6}
    assert from_bundle.generate(**question).tokens_json() == omni.generate(**question).tokens_json()
    # A bundle written before calibration existed (no outlier entries) loads as it did.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(bundle), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.endswith(".outliers")}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    old = miniomni.load(tmp_path / "old.safetensors", device="cpu", int8_activations="on")
    assert not old.plan.calibrated and old.model.llm.layers[0].mlp.down.outliers is None
    assert len(old.generate(**question).tokens_json()["audio"]) > 0
