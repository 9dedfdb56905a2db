"""Whisper from a CTranslate2 model directory (the format faster-whisper keeps on disk), read without ctranslate2.

A CTranslate2 ``model.bin`` is little-endian: a ``uint32`` format version (4 to 6 here), the
spec's name and its revision, a ``uint32`` count of variables, each one a name, a rank, that
many ``uint32`` dimensions, a type code and a byte count followed by the raw array, and (from
version 3) a table of aliases, names that share another variable's array. A string is a
``uint16`` length, then that many bytes ending in a NUL.

:func:`whisper_checkpoint_from_ct2` turns a ``WhisperSpec`` into an openai-whisper checkpoint
dict (``dims`` and ``model_state_dict``, decoder included), so everything that takes
openai-whisper's ``small.pt`` takes the directory too, at any model size. CTranslate2 fuses
the query, key and value projections (and the cross-attention's key and value) into one
matrix, with a zero bias for the key, which Whisper has none of; they are split again here.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = ["Ct2Model", "is_ct2_dir", "read_ct2", "whisper_checkpoint_from_ct2"]

MODEL_FILE = "model.bin"
# CTranslate2's DataType codes -> numpy dtypes (bfloat16 is read as raw 16-bit words).
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
_FLOAT_CODES = (0, 4, 5)


@dataclass
class Ct2Model:
    """The variables of a ``model.bin`` by name (aliases resolved), and its spec."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

    def get(self, name: str) -> torch.Tensor:
        """One variable; a CheckpointError naming the file when it is absent."""
        try:
            return self.variables[name]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: the {self.spec} model has no variable {name!r}; the file is not a complete "
                "CTranslate2 Whisper model (convert it again with ct2-transformers-converter)."
            ) from None

    def scalar(self, name: str) -> int:
        """An integer option stored as a rank-0 variable."""
        return int(self.get(name).item())


def is_ct2_dir(path: str | Path) -> bool:
    """Whether ``path`` is a CTranslate2 model directory (or its ``model.bin``)."""
    path = Path(path)
    return (path / MODEL_FILE).is_file() or (path.name == MODEL_FILE and path.is_file())


class _Reader:
    def __init__(self, data: memoryview, path: Path) -> None:
        self.data, self.path, self.offset = data, path, 0

    def take(self, size: int, what: str) -> memoryview:
        end = self.offset + size
        if end > len(self.data):
            raise CheckpointError(
                f"{self.path} ends early: {what} needs bytes {self.offset}..{end} but the file has {len(self.data)}; "
                "it is probably a half-written copy. Copy or download it again."
            )
        chunk = self.data[self.offset:end]
        self.offset = end
        return chunk

    def number(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = bytes(self.take(self.number("H", what), what))
        if not raw.endswith(b"\0"):
            raise CheckpointError(f"{self.path}: {what} is not a NUL-terminated string; the file is not a "
                                  "CTranslate2 model.bin.")
        return raw[:-1].decode("utf-8", errors="replace")


def read_ct2(path: str | Path) -> Ct2Model:
    """Every variable of a CTranslate2 ``model.bin`` (or the directory holding it), as CPU tensors."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"CTranslate2 model file {path} not found; give the directory that holds model.bin.")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"{path} is empty; it is probably a half-written copy. Copy or download it again.")
    reader = _Reader(memoryview(data), path)
    version = reader.number("I", "the format version")
    if not 4 <= version <= 6:
        raise CheckpointError(
            f"{path} is not a CTranslate2 model.bin this reader knows (format version {version}, expected 4 to 6; "
            f"the file starts with {data[:8]!r}). Give a model converted with CTranslate2 3.x or 4.x."
        )
    spec = reader.string("the spec name")
    revision = reader.number("I", "the spec revision")
    model = Ct2Model(spec, revision, path=path)
    count = reader.number("I", "the variable count")
    for index in range(count):
        name = reader.string(f"the name of variable {index}")
        rank = reader.number("B", f"the rank of {name}")
        shape = [reader.number("I", f"the shape of {name}") for _ in range(rank)]
        code = reader.number("B", f"the type of {name}")
        size = reader.number("I", f"the size of {name}")
        if code not in _DTYPES:
            raise CheckpointError(f"{path}: variable {name} has type code {code}, which this reader does not know "
                                  f"(known: {sorted(_DTYPES)}); it may be quantized to a format not supported here.")
        dtype = np.dtype(_DTYPES[code])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size != expected:
            raise CheckpointError(f"{path}: variable {name} of shape {shape} holds {size} bytes, not {expected}; "
                                  "the file is corrupt.")
        array = np.frombuffer(reader.take(size, f"the data of {name}"), dtype=dtype).reshape(shape)
        tensor = torch.from_numpy(array.copy())
        if code == 5:
            tensor = tensor.view(torch.bfloat16)
        model.variables[name] = tensor
    if reader.offset < len(data):
        for index in range(reader.number("I", "the alias count")):
            alias = reader.string(f"alias {index}")
            target = reader.string(f"the target of alias {alias}")
            model.variables[alias] = model.get(target)
    if reader.offset != len(data):
        raise CheckpointError(f"{path} has {len(data) - reader.offset} bytes after its last entry; the file is "
                              "corrupt or not a CTranslate2 model.bin.")
    return model


def _split_linear(state: dict[str, torch.Tensor], model: Ct2Model, prefix: str, names: tuple[str, ...],
                  has_bias: tuple[bool, ...], ct2: str) -> None:
    weight, bias = model.get(f"{ct2}/weight"), model.get(f"{ct2}/bias")
    width = weight.shape[0] // len(names)
    for part, (name, with_bias) in enumerate(zip(names, has_bias, strict=True)):
        rows = slice(part * width, (part + 1) * width)
        state[f"{prefix}.{name}.weight"] = weight[rows]
        if with_bias:
            state[f"{prefix}.{name}.bias"] = bias[rows]


def _copy_linear(state: dict[str, torch.Tensor], model: Ct2Model, ours: str, ct2: str, bias: bool = True) -> None:
    state[f"{ours}.weight"] = model.get(f"{ct2}/weight")
    if bias:
        state[f"{ours}.bias"] = model.get(f"{ct2}/bias")


def _copy_norm(state: dict[str, torch.Tensor], model: Ct2Model, ours: str, ct2: str) -> None:
    state[f"{ours}.weight"] = model.get(f"{ct2}/gamma")
    state[f"{ours}.bias"] = model.get(f"{ct2}/beta")


def _copy_block(state: dict[str, torch.Tensor], model: Ct2Model, ours: str, ct2: str, cross: bool) -> None:
    """One residual block: self-attention, the decoder's cross-attention when ``cross``, and the MLP."""
    _split_linear(state, model, f"{ours}.attn", ("query", "key", "value"), (True, False, True),
                  f"{ct2}/self_attention/linear_0")
    _copy_linear(state, model, f"{ours}.attn.out", f"{ct2}/self_attention/linear_1")
    _copy_norm(state, model, f"{ours}.attn_ln", f"{ct2}/self_attention/layer_norm")
    if cross:
        _copy_linear(state, model, f"{ours}.cross_attn.query", f"{ct2}/attention/linear_0")
        _split_linear(state, model, f"{ours}.cross_attn", ("key", "value"), (False, True),
                      f"{ct2}/attention/linear_1")
        _copy_linear(state, model, f"{ours}.cross_attn.out", f"{ct2}/attention/linear_2")
        _copy_norm(state, model, f"{ours}.cross_attn_ln", f"{ct2}/attention/layer_norm")
    _copy_linear(state, model, f"{ours}.mlp.0", f"{ct2}/ffn/linear_0")
    _copy_linear(state, model, f"{ours}.mlp.2", f"{ct2}/ffn/linear_1")
    _copy_norm(state, model, f"{ours}.mlp_ln", f"{ct2}/ffn/layer_norm")


def _layers(model: Ct2Model, side: str) -> int:
    found = {int(m.group(1)) for name in model.variables if (m := re.match(rf"{side}/layer_(\d+)/", name))}
    if not found or found != set(range(len(found))):
        raise CheckpointError(f"{model.path}: the {side}'s layers are missing or not numbered 0..N-1; the file is "
                              "not a complete CTranslate2 Whisper model.")
    return len(found)


def whisper_checkpoint_from_ct2(path: str | Path) -> dict[str, Any]:
    """An openai-whisper checkpoint dict (``dims``, ``model_state_dict``) from a CTranslate2 Whisper directory."""
    model = read_ct2(path)
    if model.spec != "WhisperSpec":
        raise CheckpointError(f"{model.path} holds a CTranslate2 {model.spec or 'model of unnamed spec'}, not "
                              "Whisper; give the directory of a converted Whisper model.")
    quantized = sorted(name for name in model.variables if name.endswith("weight_scale"))
    if quantized:
        raise CheckpointError(
            f"{model.path} holds quantized weights (e.g. {quantized[0]}), which this reader does not dequantize; "
            "convert the model with `ct2-transformers-converter --quantization float16` (or float32) instead."
        )
    enc_layers, dec_layers = _layers(model, "encoder"), _layers(model, "decoder")
    conv1, tokens = model.get("encoder/conv1/weight"), model.get("decoder/embeddings/weight")
    dims = {
        "n_mels": conv1.shape[1],
        "n_audio_ctx": model.get("encoder/position_encodings/encodings").shape[0],
        "n_audio_state": conv1.shape[0],
        "n_audio_head": model.scalar("encoder/num_heads"),
        "n_audio_layer": enc_layers,
        "n_vocab": tokens.shape[0],
        "n_text_ctx": model.get("decoder/position_encodings/encodings").shape[0],
        "n_text_state": tokens.shape[1],
        "n_text_head": model.scalar("decoder/num_heads"),
        "n_text_layer": dec_layers,
    }
    state: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        _copy_linear(state, model, f"encoder.{conv}", f"encoder/{conv}")
    state["encoder.positional_embedding"] = model.get("encoder/position_encodings/encodings")
    for i in range(enc_layers):
        _copy_block(state, model, f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    _copy_norm(state, model, "encoder.ln_post", "encoder/layer_norm")
    state["decoder.token_embedding.weight"] = tokens
    state["decoder.positional_embedding"] = model.get("decoder/position_encodings/encodings")
    for i in range(dec_layers):
        _copy_block(state, model, f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    _copy_norm(state, model, "decoder.ln", "decoder/layer_norm")
    return {"dims": dims, "model_state_dict": {k: v.contiguous() for k, v in state.items()}}
