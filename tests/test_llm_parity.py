"""Numerical parity of our decoder with Hugging Face Qwen2 / Llama, through the litgpt checkpoint format.

Random float32 weights are built as a litgpt ``lit_model.pth`` state dict (q/k/v fused and
grouped per key/value group), loaded into ``OmniModel`` through ``litgpt_to_state_dict`` and
into a ``transformers`` model through a conversion written here, independently of the
package. Logits must agree without a cache, with a cache decoding token by token, and for
a batch whose rows sit at different lengths in the same cache.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from miniomni.checkpoints import (
    fused_qkv_to_litgpt,
    litgpt_qkv_to_fused,
    litgpt_to_state_dict,
    state_dict_to_litgpt,
)
from miniomni.config import OmniConfig
from miniomni.models.omni import OmniModel

transformers = pytest.importorskip("transformers")

VOCAB = 181120  # the Mini-Omni layout (text 152000 + 7 x 4160); tiny models keep it

TINY = dict(
    n_layer=2,
    n_head=4,
    head_size=16,
    n_embd=64,
    intermediate_size=96,
    whisper_adapter_dim=32,
    norm_eps=1e-6,
    block_size=2048,
)

# name -> (HF architecture, OmniConfig overrides)
VARIANTS = {
    "qwen2_gqa": ("qwen2", dict(n_query_groups=2, add_qkv_bias=True, rope_base=1_000_000.0)),
    "llama_gqa": ("llama", dict(n_query_groups=2, add_qkv_bias=False, rope_base=10_000.0)),
    "llama_gqa_tied": (
        "llama",
        dict(n_query_groups=2, add_qkv_bias=False, rope_base=10_000.0, tie_word_embeddings=True),
    ),
    "llama_mha": ("llama", dict(n_query_groups=4, add_qkv_bias=False, rope_base=10_000.0)),
}

SEQ_LEN = 14
PREFILL = 5
MAX_CACHE = 32

# Measured maxima are collected here and printed once (run with -s to see them).
MEASURED: dict[str, float] = {}


def make_config(name: str) -> OmniConfig:
    return OmniConfig(**{**TINY, **VARIANTS[name][1]})


# ----------------------------------------------------------------- litgpt checkpoint


def random_litgpt_state(config: OmniConfig, seed: int) -> dict[str, torch.Tensor]:
    """A random ``lit_model.pth``-style state dict (litgpt names, grouped q/k/v)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm_weight(size: int) -> torch.Tensor:
        return torch.rand(size, generator=gen) + 0.5  # uniform in [0.5, 1.5)

    c, hidden = config.n_embd, config.intermediate_size
    qkv_rows = (config.n_head + 2 * config.n_query_groups) * config.head_size
    sd: dict[str, torch.Tensor] = {"transformer.wte.weight": normal(config.padded_vocab_size, c, std=0.3)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        sd[p + "norm_1.weight"] = norm_weight(c)
        sd[p + "attn.attn.weight"] = normal(qkv_rows, c, std=0.15)
        if config.add_qkv_bias:
            sd[p + "attn.attn.bias"] = normal(qkv_rows, std=0.1)
        sd[p + "attn.proj.weight"] = normal(c, config.n_head * config.head_size, std=0.15)
        sd[p + "norm_2.weight"] = norm_weight(c)
        sd[p + "mlp.fc_1.weight"] = normal(hidden, c, std=0.15)
        sd[p + "mlp.fc_2.weight"] = normal(hidden, c, std=0.15)
        sd[p + "mlp.proj.weight"] = normal(c, hidden, std=0.15)
    sd["transformer.ln_f.weight"] = norm_weight(c)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    else:
        sd["lm_head.weight"] = normal(config.padded_vocab_size, c, std=0.15)
    a = config.whisper_adapter_dim
    sd["whisper_adapter.fc_1.weight"] = normal(hidden, a, std=0.15)
    sd["whisper_adapter.fc_2.weight"] = normal(hidden, a, std=0.15)
    sd["whisper_adapter.proj.weight"] = normal(c, hidden, std=0.15)
    return sd


def split_grouped_qkv(fused: torch.Tensor, config: OmniConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent of the package: litgpt grouped rows -> HF q_proj / k_proj / v_proj rows.

    litgpt stores, for each key/value group g, its q_per_kv query heads, then its key head,
    then its value head. HF query head h belongs to group h // q_per_kv.
    """
    hs, q_per_kv = config.head_size, config.n_head // config.n_query_groups
    group_rows = (q_per_kv + 2) * hs
    assert fused.shape[0] == config.n_query_groups * group_rows
    q_heads, k_heads, v_heads = [], [], []
    for h in range(config.n_head):
        g, j = divmod(h, q_per_kv)
        start = g * group_rows + j * hs
        q_heads.append(fused[start : start + hs])
    for g in range(config.n_query_groups):
        start = g * group_rows + q_per_kv * hs
        k_heads.append(fused[start : start + hs])
        v_heads.append(fused[start + hs : start + 2 * hs])
    return torch.cat(q_heads), torch.cat(k_heads), torch.cat(v_heads)


def litgpt_to_hf(sd: dict[str, torch.Tensor], config: OmniConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(config.n_layer):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = split_grouped_qkv(sd[src + "attn.attn.weight"], config)
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
        if config.add_qkv_bias:
            qb, kb, vb = split_grouped_qkv(sd[src + "attn.attn.bias"], config)
            out[dst + "self_attn.q_proj.bias"] = qb
            out[dst + "self_attn.k_proj.bias"] = kb
            out[dst + "self_attn.v_proj.bias"] = vb
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attn.proj.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "norm_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "norm_2.weight"]
        out[dst + "mlp.gate_proj.weight"] = sd[src + "mlp.fc_1.weight"]
        out[dst + "mlp.up_proj.weight"] = sd[src + "mlp.fc_2.weight"]
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.proj.weight"]
    return out


def build_hf(arch: str, config: OmniConfig) -> torch.nn.Module:
    common = dict(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups,
        max_position_embeddings=2048,
        # transformers 5 keeps rope_theta inside rope_parameters
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        attn_implementation="eager",
    )
    if arch == "qwen2":
        assert config.add_qkv_bias and config.n_embd // config.n_head == config.head_size
        hf_config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(hf_config)
    else:
        hf_config = transformers.LlamaConfig(
            **common, head_dim=config.head_size, attention_bias=config.add_qkv_bias, mlp_bias=False
        )
        model = transformers.LlamaForCausalLM(hf_config)
    assert model.config.rope_parameters["rope_theta"] == config.rope_base
    assert model.config.rope_parameters["rope_type"] == "default"
    return model.float().eval()


def load_hf(model: torch.nn.Module, state: dict[str, torch.Tensor], tied: bool) -> None:
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert not [k for k in result.missing_keys if not (tied and k == "lm_head.weight")], result.missing_keys
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # every HF parameter now holds exactly the converted tensor
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in state.items():
        assert torch.equal(params[key], tensor), key


@functools.cache
def models(name: str):
    """(config, litgpt dict, our Transformer, HF model) for a variant, built once."""
    arch, _ = VARIANTS[name]
    config = make_config(name)
    lit = random_litgpt_state(config, seed=1234 + len(name))
    ours_state = litgpt_to_state_dict(lit, config)
    omni = OmniModel(config)
    result = omni.load_state_dict(ours_state, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        assert result.missing_keys == ["llm.lm_head.weight"] and not result.unexpected_keys
        assert omni.llm.lm_head.weight is omni.llm.embed.weight
    omni.eval()
    hf = build_hf(arch, config)
    load_hf(hf, litgpt_to_hf(lit, config), config.tie_word_embeddings)
    return config, lit, omni, hf


def token_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


@functools.cache
def hf_reference(name: str, batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, _, hf = models(name)
    ids = token_ids(batch, length, seed)
    with torch.no_grad():
        logits = hf(input_ids=ids, use_cache=False).logits
    return ids, logits


def tolerance(reference: torch.Tensor) -> float:
    return 1e-4 * max(1.0, reference.abs().max().item())


def record(key: str, value: float) -> None:
    MEASURED[key] = max(MEASURED.get(key, 0.0), value)


@pytest.fixture(scope="module", autouse=True)
def _report_measurements():
    yield
    if MEASURED:
        print("\nmax |ours - reference| per check:")
        for key, value in sorted(MEASURED.items()):
            print(f"  {key:40s} {value:.3e}")


def cached_step(llm, ids, positions, cache, kv_len) -> torch.Tensor:
    return llm.lm_head(llm.forward_hidden(llm.embed(ids), positions, cache, kv_len))


# ----------------------------------------------------------------- 1. HF parity

PARITY = pytest.mark.parametrize("name", list(VARIANTS))


@PARITY
def test_prefill_logits_match_hf_without_cache(name: str) -> None:
    config, _, omni, hf = models(name)
    ids, ref = hf_reference(name, 1, SEQ_LEN, seed=7)
    with torch.no_grad():
        ours = omni.llm(ids)
    assert ours.shape == ref.shape == (1, SEQ_LEN, VOCAB)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    diff = (ours - ref).abs().max().item()
    record(f"{name}: full sequence, no cache", diff)
    assert diff <= tolerance(ref), diff

    # Explicit increasing positions that do not start at 0 and have gaps (RoPE is relative,
    # so gaps change the logits) match HF given the same position_ids.
    positions = 37 + 3 * torch.arange(SEQ_LEN)
    with torch.no_grad():
        ours_shifted = omni.llm(ids, positions)
        # an explicit all-ones mask: without one, transformers 5 reads gapped position_ids
        # as packed sequences and restricts attention to each "sequence"
        ref_shifted = hf(
            input_ids=ids,
            position_ids=positions.unsqueeze(0),
            attention_mask=torch.ones_like(ids),
            use_cache=False,
        ).logits
    diff = (ours_shifted - ref_shifted).abs().max().item()
    record(f"{name}: gapped positions, no cache", diff)
    assert diff <= tolerance(ref_shifted), diff
    # and the gaps really changed the result
    assert (ref_shifted - ref).abs().max() > 1e-2


@PARITY
def test_cached_decode_matches_hf_full_sequence(name: str) -> None:
    config, _, omni, _ = models(name)
    llm = omni.llm
    ids, ref = hf_reference(name, 1, SEQ_LEN, seed=7)
    cache = llm.new_cache(1, MAX_CACHE)
    assert cache.keys[0].shape == (1, config.n_query_groups, MAX_CACHE, config.head_size)
    worst = 0.0
    with torch.no_grad():
        logits = cached_step(llm, ids[:, :PREFILL], torch.arange(PREFILL), cache, PREFILL)
        diff = (logits - ref[:, :PREFILL]).abs().max().item()
        record(f"{name}: cached prefill", diff)
        assert diff <= tolerance(ref), diff
        for t in range(PREFILL, SEQ_LEN):
            step = cached_step(llm, ids[:, t : t + 1], torch.tensor([t]), cache, t + 1)
            diff = (step[:, 0] - ref[:, t]).abs().max().item()
            worst = max(worst, diff)
            assert diff <= tolerance(ref), (t, diff)
    record(f"{name}: cached decode, per step", worst)

    # The public forward() (kv_len defaults to position + 1) and reading the whole cache
    # (kv_len = max_length; unwritten slots are masked) give the same last step.
    with torch.no_grad():
        t = SEQ_LEN - 1
        again = llm(ids[:, t : t + 1], torch.tensor([t]), cache)
        whole = cached_step(llm, ids[:, t : t + 1], torch.tensor([t]), cache, MAX_CACHE)
    assert (again[:, 0] - ref[:, t]).abs().max().item() <= tolerance(ref)
    assert (whole[:, 0] - ref[:, t]).abs().max().item() <= tolerance(ref)


@PARITY
def test_batched_rows_at_different_lengths_match_rows_alone(name: str) -> None:
    """Two rows in one cache, row 1 lagging row 0 by LAG positions (2-D per-row positions)."""
    config, _, omni, _ = models(name)
    llm = omni.llm
    lag, prefill0, steps = 3, 6, 6
    prefill1 = prefill0 - lag
    length = prefill0 + steps
    ids, ref = hf_reference(name, 2, length, seed=11)

    # Each row run alone through our model (no cache) agrees with HF; it is the reference below.
    with torch.no_grad():
        alone = torch.cat([llm(ids[b : b + 1]) for b in range(2)])
    diff = (alone - ref).abs().max().item()
    record(f"{name}: rows alone vs HF", diff)
    assert diff <= tolerance(ref)

    cache = llm.new_cache(2, MAX_CACHE)
    with torch.no_grad():
        # Joint prefill of prefill0 slots: row 1 has only prefill1 real tokens, its last LAG
        # slots are padding whose keys/values land in its cache beyond its length and must be
        # overwritten before they are ever attended to.
        pad = torch.full((lag,), 12345)
        prompt = torch.stack([ids[0, :prefill0], torch.cat([ids[1, :prefill1], pad])])
        positions = torch.arange(prefill0).expand(2, prefill0)
        logits = cached_step(llm, prompt, positions, cache, prefill0)
        diff0 = (logits[0] - alone[0, :prefill0]).abs().max().item()
        diff1 = (logits[1, :prefill1] - alone[1, :prefill1]).abs().max().item()
        worst = max(diff0, diff1)
        assert worst <= tolerance(ref), (diff0, diff1)

        # Decode: row 0 at positions prefill0.., row 1 at prefill1.. (LAG behind), one cache.
        for s in range(steps):
            p0, p1 = prefill0 + s, prefill1 + s
            step_ids = torch.stack([ids[0, p0 : p0 + 1], ids[1, p1 : p1 + 1]])
            step_pos = torch.tensor([[p0], [p1]])
            step = cached_step(llm, step_ids, step_pos, cache, p0 + 1)
            d0 = (step[0, 0] - alone[0, p0]).abs().max().item()
            d1 = (step[1, 0] - alone[1, p1]).abs().max().item()
            worst = max(worst, d0, d1)
            assert d0 <= tolerance(ref) and d1 <= tolerance(ref), (s, d0, d1)
            # row 1 also equals HF at its own position
            assert (step[1, 0] - ref[1, p1]).abs().max().item() <= tolerance(ref)
    record(f"{name}: batch of 2, lagging row, cached", worst)


# ----------------------------------------------------------------- 2. round trips


@pytest.mark.parametrize("name", list(VARIANTS))
def test_litgpt_round_trip_is_exact(name: str) -> None:
    config, lit, omni, _ = models(name)
    back = state_dict_to_litgpt(litgpt_to_state_dict(lit, config), config)
    assert set(back) == set(lit)
    for key, tensor in lit.items():
        assert back[key].shape == tensor.shape and torch.equal(back[key], tensor), key
    # from the loaded model's own state dict too (what `miniomni` writes as lit_model.pth)
    from_model = state_dict_to_litgpt(omni.state_dict(), config)
    assert set(from_model) == set(lit)
    for key, tensor in lit.items():
        assert torch.equal(from_model[key], tensor), key
    # the package's fused layout is [all q; all k; all v] in HF head order
    for i in range(config.n_layer):
        fused = omni.llm.layers[i].attn.qkv.weight
        assert torch.equal(fused, torch.cat(split_grouped_qkv(lit[f"transformer.h.{i}.attn.attn.weight"], config)))


@pytest.mark.parametrize(
    "n_head,n_query_groups,head_size",
    [(4, 2, 16), (4, 4, 16), (4, 1, 16), (14, 2, 8), (6, 3, 4)],
)
def test_qkv_regrouping_round_trip(n_head: int, n_query_groups: int, head_size: int) -> None:
    config = OmniConfig(
        **{**TINY, "n_head": n_head, "n_query_groups": n_query_groups, "head_size": head_size, "n_embd": 24}
    )
    rows = (n_head + 2 * n_query_groups) * head_size
    gen = torch.Generator().manual_seed(n_head * 100 + n_query_groups)
    weight = torch.randn(rows, 24, generator=gen)
    bias = torch.randn(rows, generator=gen)
    for w in (weight, bias):
        fused = litgpt_qkv_to_fused(w, config)
        assert fused.shape == w.shape
        assert torch.equal(fused, torch.cat(split_grouped_qkv(w, config)))
        assert torch.equal(fused_qkv_to_litgpt(fused, config), w)
        assert torch.equal(litgpt_qkv_to_fused(fused_qkv_to_litgpt(w, config), config), w)
    if n_query_groups not in (1, n_head):
        assert not torch.equal(litgpt_qkv_to_fused(weight, config), weight)  # a real permutation


# ----------------------------------------------------------------- 3. published sizes


def expected_parameter_count(c: OmniConfig) -> int:
    embed = c.padded_vocab_size * c.n_embd
    head = 0 if c.tie_word_embeddings else c.padded_vocab_size * c.n_embd
    qkv_rows = (c.n_head + 2 * c.n_query_groups) * c.head_size
    attn = qkv_rows * c.n_embd + (qkv_rows if c.add_qkv_bias else 0) + c.n_head * c.head_size * c.n_embd
    mlp = 3 * c.n_embd * c.intermediate_size
    norms = 2 * c.n_embd
    adapter = 2 * c.whisper_adapter_dim * c.intermediate_size + c.intermediate_size * c.n_embd
    return embed + head + c.n_layer * (attn + mlp + norms) + c.n_embd + adapter


@pytest.mark.parametrize("tied", [False, True])
def test_mini_omni_sizes_on_meta_device(tied: bool) -> None:
    config = OmniConfig(tie_word_embeddings=tied)
    assert (config.n_layer, config.n_head, config.n_query_groups, config.head_size) == (24, 14, 2, 64)
    assert (config.n_embd, config.intermediate_size, config.padded_vocab_size) == (896, 4864, 181120)
    assert (config.whisper_adapter_dim, config.add_qkv_bias, config.rope_base) == (768, True, 1_000_000.0)
    with torch.device("meta"):
        model = OmniModel(config)
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    expected = expected_parameter_count(config)
    assert count == expected
    if tied:
        assert count == expected_parameter_count(OmniConfig()) - 181120 * 896
    else:
        assert count == 694_294_400
        assert 690_000_000 <= count <= 700_000_000
    # the litgpt layout of the published checkpoint, shapes included
    lit = state_dict_to_litgpt(model.state_dict(), config)
    assert lit["transformer.wte.weight"].shape == (181120, 896)
    assert lit["lm_head.weight"].shape == (181120, 896)
    assert lit["transformer.h.23.attn.attn.weight"].shape == (1152, 896)
    assert lit["transformer.h.23.attn.attn.bias"].shape == (1152,)
    assert lit["transformer.h.0.attn.proj.weight"].shape == (896, 896)
    assert lit["transformer.h.0.mlp.fc_1.weight"].shape == (4864, 896)
    assert lit["transformer.h.0.mlp.proj.weight"].shape == (896, 4864)
    assert lit["whisper_adapter.fc_1.weight"].shape == (4864, 768)
    assert lit["whisper_adapter.proj.weight"].shape == (896, 4864)
    assert "transformer.h.24.norm_1.weight" not in lit
    assert len(lit) == 24 * 8 + 6


# ----------------------------------------------------------------- 4. bfloat16


def test_bfloat16_close_to_float32() -> None:
    name = "qwen2_gqa"
    config, _, omni, _ = models(name)
    ids, ref = hf_reference(name, 1, 24, seed=3)
    with torch.no_grad():
        ours32 = omni.llm(ids)
        llm16 = copy.deepcopy(omni.llm).to(torch.bfloat16)
        llm16.init_rope()  # documented: rebuild the float32 RoPE tables after a cast
        assert llm16.rope_cos.dtype == torch.float32
        ours16 = llm16(ids)
        # cached decode in bf16 (bf16 cache) as well
        cache = llm16.new_cache(1, MAX_CACHE)
        assert cache.keys[0].dtype == torch.bfloat16
        steps = [cached_step(llm16, ids[:, :PREFILL], torch.arange(PREFILL), cache, PREFILL)]
        for t in range(PREFILL, ids.shape[1]):
            steps.append(cached_step(llm16, ids[:, t : t + 1], torch.tensor([t]), cache, t + 1))
        cached16 = torch.cat(steps, dim=1)
    assert ours16.dtype == torch.bfloat16
    for label, low in (("bf16 full", ours16), ("bf16 cached", cached16)):
        low = low.float()
        cosine = F.cosine_similarity(low[0], ref[0], dim=-1)
        agree = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
        MEASURED[f"{name}: {label} min cosine"] = cosine.min().item()
        MEASURED[f"{name}: {label} argmax agreement"] = agree
        record(f"{name}: {label} max abs diff", (low - ref).abs().max().item())
        assert cosine.min() > 0.99, cosine
        assert agree >= 0.75, agree
    assert torch.equal(ours32.argmax(-1), ref.argmax(-1))
