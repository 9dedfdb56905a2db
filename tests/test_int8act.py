"""int8 weights times per-row int8 activations: error bounds, and batch invariance from 1 to 16 rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import miniomni
from miniomni import int8act
from miniomni.int8act import Int8ActLinear, use_int8_activations
from miniomni.precision import machine
from miniomni.quantize import Int8Linear, quantize_int8

pytestmark = pytest.mark.skipif(not int8act.available(), reason="fbgemm's int8 products need an x86 PyTorch")


@pytest.mark.parametrize("bits", [8, 7])
def test_each_row_is_its_own_whatever_the_batch(bits):
    torch.manual_seed(bits)
    linear = nn.Linear(96, 200, bias=True)
    quantized = Int8Linear.from_linear(linear)
    product = Int8ActLinear([quantized], bits)
    x = torch.randn(16, 96) * torch.logspace(-2, 2, 16)[:, None]  # rows of very different sizes
    x[3] = 0  # a silent row
    alone = torch.cat([product(x[i : i + 1]) for i in range(16)])
    for rows in range(1, 17):
        assert torch.equal(product(x[:rows]), alone[:rows]), rows
    reference = linear(x)
    relative = ((alone - reference).norm(dim=1) / reference.norm(dim=1)).max()
    if bits == 7 or machine().vnni:  # 8 bits saturate fbgemm's 16-bit sums without VNNI: why 7 are used there
        assert relative < (0.02 if bits == 8 else 0.04), float(relative)  # measured ~0.9 % and ~1.6 %
    assert product(x.bfloat16()).dtype == torch.bfloat16  # the caller's dtype back


def test_fused_gate_up_equals_the_two_products():
    torch.manual_seed(0)
    gate, up = (Int8Linear.from_linear(nn.Linear(64, 128)) for _ in range(2))
    fused = Int8ActLinear([gate, up], 8)
    x = torch.randn(5, 64)
    both = fused(x)
    assert torch.equal(both[:, :128], Int8ActLinear([gate], 8)(x))
    assert torch.equal(both[:, 128:], Int8ActLinear([up], 8)(x))


def test_only_the_blocks_products_change(omni):
    import copy

    llm = quantize_int8(copy.deepcopy(omni.model.llm))
    blocks = len(llm.layers)
    assert use_int8_activations(llm, 8) == 4 * blocks  # q/k/v, output, gate+up, down
    assert llm.lm_head.int8_activations is None  # the heads stay weight-only
    fresh = quantize_int8(copy.deepcopy(omni.model.llm))
    assert use_int8_activations(fresh, 8, ("down",)) == blocks
    assert fresh.layers[0].mlp.gate_up is None and fresh.layers[0].attn.qkv.int8_activations is None
    with pytest.raises(ValueError, match="unknown products"):
        use_int8_activations(fresh, 8, ("lm_head",))
    assert "int8_activations" not in str(list(llm.state_dict()))  # nothing new to save or load


@pytest.fixture(scope="module")
def int8_omni(checkpoint_dir):
    omni = miniomni.load(checkpoint_dir, device="cpu", quantize="int8", int8_activations="on")
    assert omni.plan.int8_activations in (7, 8)
    return omni


def test_a_decoder_pass_is_batch_invariant_for_every_batch_size(int8_omni):
    model = int8_omni.model
    torch.manual_seed(1)
    x = torch.randn(16, 1, model.config.n_embd, dtype=int8_omni.dtype)  # one position a row, as a decode step
    with torch.inference_mode():
        alone = [model.llm.forward_hidden(x[i : i + 1]) for i in range(16)]
        for rows in range(1, 17):
            together = model.llm.forward_hidden(x[:rows])
            for i in range(rows):
                assert torch.equal(together[i : i + 1], alone[i]), (rows, i)


def test_prompts_past_max_rows_take_the_weight_only_path(omni):
    import copy

    from miniomni.quantize import int8_linear

    llm = quantize_int8(copy.deepcopy(omni.model.llm))
    use_int8_activations(llm, 8, max_rows=4)
    qkv, mlp = llm.layers[0].attn.qkv, llm.layers[0].mlp
    short, long = torch.randn(4, qkv.in_features), torch.randn(5, qkv.in_features)
    assert torch.equal(qkv(short), qkv.int8_activations(short))
    assert torch.equal(qkv(long), int8_linear(long, qkv.weight, qkv.scales, qkv.bias))
    assert torch.equal(mlp(long), mlp.down(torch.nn.functional.silu(mlp.gate(long)) * mlp.up(long)))


def test_prompts_take_the_int8_products_where_a_prefill_measures_faster(omni):
    import copy
    import dataclasses

    from miniomni.int8act import products
    from miniomni.precision import confirm_prompts

    model = copy.deepcopy(omni.model)
    model.llm = quantize_int8(model.llm)
    use_int8_activations(model.llm, 8, max_rows=16)
    plan = dataclasses.replace(omni.plan, why="test")
    confirmed = confirm_prompts(model, plan, positions=32)
    limits = {p.max_rows for p in products(model.llm)}
    assert len(limits) == 1 and limits <= {16, None}  # every product the same way
    chosen = "int8" if limits == {None} else "bfloat16"
    assert confirmed.why.startswith("test; a 32-position prompt measured: bfloat16 GEMM ")
    assert confirmed.why.endswith(f"so {chosen}")
    for product in products(model.llm):  # nothing to decide where every product already takes prompts
        product.max_rows = None
    assert confirm_prompts(model, plan) is plan
