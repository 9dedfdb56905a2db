"""Start a Mini-Omni model from any causal LM of the Qwen2 / Llama family ("Any Model Can Talk").

``init_from_lm(source, out_dir, whisper=..., snac=...)`` reads a Hugging Face checkpoint
directory (``config.json`` + ``*.safetensors``, sharded or not, ``tokenizer.json``) or a GGUF
file (llama.cpp; quantized tensors are dequantized), grows its vocabulary to the 181,120-row
Mini-Omni layout, adds a fresh Whisper-to-LLM audio adapter, and writes the published
directory layout, so ``miniomni.load(out_dir)`` and ``miniomni generate`` work on the result.

Vocabulary: the layout is the same as the published model's, over the source's own text
vocabulary. Text ids keep their place; a source with fewer than 151,936 text tokens leaves the
rows between its vocabulary size and 152,000 unused (new rows), so every special id
(``_eot`` = 151936 …) and every audio id (152000 + 4160·i + c) is where the published model has it
(``docs/decoding.md``): prompts, the decoder, the training collator and checkpoints stay
interchangeable with the published model's layout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import (
    SNAC_DIR,
    WHISPER_FILE,
    read_whisper_file,
    state_dict_to_litgpt,
)
from ..devices import resolve_dtype
from ..errors import CheckpointError
from ..models.ctranslate2 import is_ct2_dir, whisper_checkpoint_from_ct2
from ..models.whisper import encoder_state_dict_from_whisper
from .grow import ROWS, SourceLM, grow_to_omni

log = logging.getLogger(__name__)

SUPPORTED_HF_TYPES = ("qwen2", "llama", "mistral")
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")


# ------------------------------------------------------------------ Hugging Face directory


_HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.o_proj.weight": "attn.out.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}


def read_hf_dir(directory: str | Path, block_size: int = 2048) -> SourceLM:
    """A Hugging Face Qwen2 / Llama checkpoint directory (safetensors weights)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; give a Hugging Face model directory or a .gguf file")
    hf = json.loads(config_path.read_text())
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_HF_TYPES:
        raise CheckpointError(f"model_type {model_type!r} is not supported; "
                              f"use a {'/'.join(SUPPORTED_HF_TYPES)} causal LM")
    # transformers < 5 writes rope_theta / rope_scaling; 5.x writes rope_parameters.
    rope = dict(hf.get("rope_scaling") or {})
    rope.update(hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise CheckpointError(f"{config_path}: RoPE type {rope_type!r} is not supported (plain RoPE only)")
    rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if hf.get("use_sliding_window"):
        raise CheckpointError(f"{config_path}: sliding-window attention is not supported")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{config_path}: mlp_bias is not supported")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise CheckpointError(f"{config_path}: attention_bias (bias on q/k/v and o) is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{config_path}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU/silu only)")
    n_head = hf["num_attention_heads"]
    n_embd = hf["hidden_size"]
    config = dict(
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        head_size=hf.get("head_dim") or n_embd // n_head,
        n_embd=n_embd,
        intermediate_size=hf["intermediate_size"],
        add_qkv_bias=model_type == "qwen2",
        rope_base=rope_theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        block_size=block_size,
    )
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors weights (save with safe_serialization=True)")
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        raw.update(load_file(str(file)))
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        name = key.removeprefix("model.")
        if name == "embed_tokens.weight":
            state["llm.embed.weight"] = tensor
        elif name == "norm.weight":
            state["llm.final_norm.weight"] = tensor
        elif key == "lm_head.weight":
            state["llm.lm_head.weight"] = tensor
        elif name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if rest in _HF_LAYER:
                state[f"llm.layers.{index}.{_HF_LAYER[rest]}"] = tensor
            elif ((not rest.startswith("self_attn.") or rest.split(".")[1] not in ("q_proj", "k_proj", "v_proj"))
                  and "rotary_emb" not in rest):
                raise CheckpointError(f"{directory}: unexpected tensor {key}")
        elif "rotary_emb" not in name:
            raise CheckpointError(f"{directory}: unexpected tensor {key}")
    for index in range(config["n_layer"]):
        prefix = f"model.layers.{index}.self_attn."
        for kind in ("weight", "bias"):
            parts = [raw.get(f"{prefix}{p}_proj.{kind}") for p in ("q", "k", "v")]
            if all(p is not None for p in parts):
                state[f"llm.layers.{index}.attn.qkv.{kind}"] = torch.cat(parts)
            elif kind == "weight":
                raise CheckpointError(f"{directory}: layer {index} lacks q/k/v projection weights")
    tied = bool(hf.get("tie_word_embeddings", False)) or "llm.lm_head.weight" not in state
    if tied:
        state.pop("llm.lm_head.weight", None)
    tokenizer_path = directory / "tokenizer.json"
    tokenizer_json = tokenizer_path.read_text(encoding="utf-8") if tokenizer_path.is_file() else None
    return SourceLM(config, state, state["llm.embed.weight"].shape[0], tied, tokenizer_json)


# ------------------------------------------------------------------------------- GGUF


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def unpermute_gguf_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion permutation of q / k rows (interleaved RoPE -> rotate-half).

    ``convert_hf_to_gguf`` reshapes each head's rows to (2, head_size/2) and swaps the axes;
    this is the inverse, per head (``n_heads`` = query heads for q, key/value heads for k).
    """
    rest = weight.shape[1:]
    return (weight.reshape(n_heads, weight.shape[0] // n_heads // 2, 2, *rest)
            .transpose(1, 2).reshape(weight.shape))


def _gguf_tensor(tensor: Any) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        array = np.asarray(tensor.data, dtype=np.float32)
    else:
        array = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists ne0 (the inner dim) first
    return torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))


def tokenizer_json_from_gguf(reader: Any) -> str | None:
    """Build a ``tokenizers`` tokenizer.json from ``tokenizer.ggml.*`` (byte-level BPE "gpt2" models only)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
    )

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        return None
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges") or []
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre in ("smollm", "starcoder", "refact"):
        # llama.cpp splits digits one by one before the GPT-2 regex for these models.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("qwen2",):
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if int(t) == 3]
    if special:
        tokenizer.add_special_tokens(special)
    return tokenizer.to_str()


def read_gguf(path: str | Path, block_size: int = 2048) -> SourceLM:
    """A llama.cpp GGUF file of the llama / qwen2 architectures; quantized tensors are dequantized."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} not found")
    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; "
                              f"use {'/'.join(SUPPORTED_GGUF_ARCHS)}")
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    head_size = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise CheckpointError(f"{path}: RoPE scaling is not supported")
    config = dict(
        n_layer=int(_field(reader, f"{arch}.block_count")),
        n_head=n_head,
        n_query_groups=n_kv,
        head_size=head_size,
        n_embd=n_embd,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        add_qkv_bias=False,
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        block_size=block_size,
    )
    names = {
        "token_embd.weight": "llm.embed.weight",
        "output_norm.weight": "llm.final_norm.weight",
        "output.weight": "llm.lm_head.weight",
    }
    per_layer = {
        "attn_norm.weight": "attn_norm.weight",
        "ffn_norm.weight": "mlp_norm.weight",
        "attn_output.weight": "attn.out.weight",
        "ffn_gate.weight": "mlp.gate.weight",
        "ffn_up.weight": "mlp.up.weight",
        "ffn_down.weight": "mlp.down.weight",
    }
    qkv: dict[tuple[int, str, str], torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name in names:
            state[names[name]] = _gguf_tensor(tensor)
            continue
        parts = name.split(".", 2)
        if parts[0] != "blk" or len(parts) != 3:
            if name == "rope_freqs.weight":
                raise CheckpointError(f"{path}: per-dimension RoPE frequencies (rope_freqs) are not supported")
            raise CheckpointError(f"{path}: unexpected tensor {name}")
        index, rest = int(parts[1]), parts[2]
        if rest in per_layer:
            state[f"llm.layers.{index}.{per_layer[rest]}"] = _gguf_tensor(tensor)
        elif rest.split(".")[0] in ("attn_q", "attn_k", "attn_v"):
            kind = rest.split(".")[1]
            qkv[(index, rest.split(".")[0], kind)] = _gguf_tensor(tensor)
        else:
            raise CheckpointError(f"{path}: unexpected tensor {name}")
    for index in range(config["n_layer"]):
        for kind in ("weight", "bias"):
            q, k, v = (qkv.get((index, p, kind)) for p in ("attn_q", "attn_k", "attn_v"))
            if q is None:
                continue
            if arch == "llama":  # llama.cpp permuted these for its interleaved RoPE; qwen2 is stored as is
                q, k = unpermute_gguf_qk(q, n_head), unpermute_gguf_qk(k, n_kv)
            else:
                config["add_qkv_bias"] = config["add_qkv_bias"] or kind == "bias"
            state[f"llm.layers.{index}.attn.qkv.{kind}"] = torch.cat((q, k, v))
    tied = "llm.lm_head.weight" not in state
    tokenizer_json = tokenizer_json_from_gguf(reader)
    return SourceLM(config, state, state["llm.embed.weight"].shape[0], tied, tokenizer_json)


def read_source(source: str | Path, block_size: int = 2048) -> SourceLM:
    """A Hugging Face directory or a ``.gguf`` file."""
    path = Path(source)
    if path.is_dir():
        return read_hf_dir(path, block_size)
    if path.suffix.lower() == ".gguf" or (path.is_file() and _is_gguf(path)):
        return read_gguf(path, block_size)
    raise CheckpointError(f"{source}: give a Hugging Face model directory (config.json + *.safetensors) "
                          "or a .gguf file")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


# ------------------------------------------------------------------------- writing


def _place(src: Path, dst: Path, link: bool) -> None:
    if dst.exists() or dst.is_symlink():
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    if link:
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def init_from_lm(
    source: str | Path,
    out_dir: str | Path,
    whisper: str | Path,
    snac: str | Path,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    untie: bool = False,
    link: bool = False,
    block_size: int = 2048,
    rows: str = "prompt",
) -> Path:
    """Write a Mini-Omni checkpoint directory (published layout) started from a causal LM.

    ``source``: a Hugging Face Qwen2 / Llama directory or a GGUF file. ``whisper``: an
    openai-whisper ``small.pt`` or a CTranslate2 Whisper directory, any size (its width sizes the
    adapter); a CTranslate2 one is written converted, as ``small.pt``. ``snac``: a directory with the
    SNAC ``config.json`` + ``pytorch_model.bin``. ``tokenizer``: a tokenizer.json to use instead
    of the source's (needed when the source ships none). ``link`` symlinks ``small.pt`` and SNAC
    instead of copying them. ``dtype`` is the dtype of ``lit_model.pth``. ``rows`` says how the new rows
    start (:mod:`.grow`): ``"prompt"`` makes the grown model read a text prompt as the source does.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    whisper, snac = Path(whisper), Path(snac)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, allowed=(torch.float32, torch.bfloat16, torch.float16))
    if not (snac / "config.json").is_file() or not (snac / "pytorch_model.bin").is_file():
        raise CheckpointError(f"{snac} is not a SNAC directory (config.json + pytorch_model.bin)")
    whisper_ckpt = None  # the converted checkpoint when ``whisper`` is a CTranslate2 directory
    if is_ct2_dir(whisper):
        whisper_ckpt = whisper_checkpoint_from_ct2(whisper)
        whisper_dims, _ = encoder_state_dict_from_whisper(whisper_ckpt, source=f"CTranslate2 Whisper '{whisper}'")
    elif whisper.is_dir():
        raise CheckpointError(f"{whisper} is a directory without model.bin; give openai-whisper's small.pt "
                              "or a CTranslate2 Whisper directory (model.bin, as faster-whisper keeps it)")
    else:
        whisper_dims, _ = read_whisper_file(whisper, f"give openai-whisper's small.pt (got {whisper})")
    lm = read_source(source, block_size)
    if tokenizer is not None:
        tokenizer_json = Path(tokenizer).read_text(encoding="utf-8")
    elif lm.tokenizer_json is not None:
        tokenizer_json = lm.tokenizer_json
    else:
        raise CheckpointError(f"{source} has no tokenizer.json this tool can use; "
                              "pass one with tokenizer=PATH / --tokenizer")
    from tokenizers import Tokenizer

    tok_size = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
    if tok_size > lm.vocab_size:
        raise CheckpointError(f"the tokenizer has {tok_size} tokens but the model only {lm.vocab_size} embedding rows")
    config, state = grow_to_omni(lm, whisper_dims.n_audio_state, seed=seed, untie=untie, rows=rows,
                                 tokenizer_json=tokenizer_json)
    del lm
    state = {k: v.to(dtype) for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    config.to_yaml(out_dir / "model_config.yaml")
    tmp = out_dir / "lit_model.pth.partial"
    torch.save(state_dict_to_litgpt(state, config), tmp)
    os.replace(tmp, out_dir / "lit_model.pth")
    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    if whisper_ckpt is None:
        _place(whisper, out_dir / WHISPER_FILE, link)
    else:
        tmp = out_dir / f"{WHISPER_FILE}.partial"
        torch.save(whisper_ckpt, tmp)
        os.replace(tmp, out_dir / WHISPER_FILE)
    _place(snac, out_dir / SNAC_DIR, link)
    log.info("wrote %s in %.1f s", out_dir, time.perf_counter() - started)
    return out_dir


# ----------------------------------------------------------------------------- CLI


def add_init_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``init-model`` on an argparse subparsers object; ``run_init`` runs it."""
    parser = subparsers.add_parser(
        "init-model",
        help="start a Mini-Omni checkpoint from a Qwen2/Llama causal LM (HF directory or GGUF)",
        description="Grow a causal LM's vocabulary to the Mini-Omni layout, add a fresh audio adapter, "
                    "and write the published checkpoint layout (train it before use).",
    )
    parser.add_argument("--from", dest="source", required=True, help="HF model directory or .gguf file")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--whisper", required=True,
                        help="openai-whisper small.pt or a CTranslate2 Whisper directory (written as small.pt)")
    parser.add_argument("--snac", required=True, help="SNAC directory (config.json + pytorch_model.bin)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the source's)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default="prompt", choices=ROWS,
                        help="how the new rows start: 'prompt' (default) reads a text prompt as the source LM "
                             "does (separate output table); 'mean' keeps the source's tables and fills new rows "
                             "with the mean row plus noise")
    parser.add_argument("--untie", action="store_true",
                        help="with --rows mean: store a separate lm_head even if the source ties it")
    parser.add_argument("--link", action="store_true", help="symlink small.pt and snac/ instead of copying")
    parser.set_defaults(func=run_init)
    return parser


def run_init(args: argparse.Namespace) -> int:
    """Errors are CheckpointErrors: the CLI prints them and exits with 2."""
    out = init_from_lm(args.source, args.out, whisper=args.whisper, snac=args.snac, tokenizer=args.tokenizer,
                       dtype=args.dtype, seed=args.seed, untie=args.untie, link=args.link,
                       rows=args.rows)
    print(f"wrote {out}")
    return 0
