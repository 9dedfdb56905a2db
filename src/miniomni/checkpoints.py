"""Every checkpoint format and hub id in one place: the published directory layout,
the single-file safetensors bundle, hub downloads, safe ``.pth`` loading, and the
Whisper encoder or SNAC codec loaded on their own.

Published layout (``miniomni download DIR`` writes it)::

    DIR/model_config.yaml      gpt-omni/mini-omni
    DIR/lit_model.pth          gpt-omni/mini-omni   (litgpt state dict)
    DIR/tokenizer.json         gpt-omni/mini-omni
    DIR/small.pt               gpt-omni/mini-omni2  (openai-whisper small; or DIR/whisper/, CTranslate2)
    DIR/snac/config.json       hubertsiuzdak/snac_24khz
    DIR/snac/pytorch_model.bin hubertsiuzdak/snac_24khz
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .calibration import calibration_ids
from .codec import Codec
from .config import OmniConfig
from .errors import CheckpointError, MiniOmniError
from .hub import host_resolves, manual_download_hint
from .models.ctranslate2 import is_ct2_dir, whisper_checkpoint_from_ct2
from .models.omni import OmniModel
from .models.whisper import WhisperDims, WhisperEncoder, encoder_state_dict_from_whisper
from .quantize import parse_quantize, quantize_weight
from .safeload import load_torch_file

log = logging.getLogger(__name__)

MINI_OMNI_REPO = "gpt-omni/mini-omni"
MINI_OMNI_FILES = ("model_config.yaml", "lit_model.pth", "tokenizer.json")
WHISPER_REPO = "gpt-omni/mini-omni2"
WHISPER_FILE = "small.pt"
SNAC_REPO = "hubertsiuzdak/snac_24khz"
SNAC_DIR = "snac"
SNAC_FILES = ("config.json", "pytorch_model.bin")
OPENAI_WHISPER_CACHE = Path.home() / ".cache" / "whisper" / WHISPER_FILE

BUNDLE_FORMAT = "miniomni-bundle"
BUNDLE_VERSION = "1"


def _fix_hint(directory: Path) -> str:
    return f"run `miniomni download {directory}` (needs internet) or copy the published files there"


@dataclass
class CheckpointParts:
    """Everything a pipeline needs, in memory, independent of the file format it came from."""

    config: OmniConfig
    model_state: dict[str, torch.Tensor]  # OmniModel state dict (this package's names)
    whisper_dims: WhisperDims
    whisper_state: dict[str, torch.Tensor]  # WhisperEncoder state dict (without "encoder.")
    snac_config: dict[str, Any]
    snac_state: dict[str, torch.Tensor]
    tokenizer_json: str
    quantize: str | None = None  # "int8": model_state holds Int8Linear weights and scales
    weights_file: Path | None = None  # the file model_state is memory-mapped from, if any


# ------------------------------------------------------------------- litgpt <-> ours

_LITGPT_LAYER = {
    "norm_1.weight": "attn_norm.weight",
    "attn.proj.weight": "attn.out.weight",
    "attn.proj.bias": "attn.out.bias",
    "norm_2.weight": "mlp_norm.weight",
    "mlp.fc_1.weight": "mlp.gate.weight",
    "mlp.fc_2.weight": "mlp.up.weight",
    "mlp.proj.weight": "mlp.down.weight",
    "mlp.fc_1.bias": "mlp.gate.bias",
    "mlp.fc_2.bias": "mlp.up.bias",
    "mlp.proj.bias": "mlp.down.bias",
}
_LITGPT_TOP = {
    "transformer.wte.weight": "llm.embed.weight",
    "transformer.ln_f.weight": "llm.final_norm.weight",
    "lm_head.weight": "llm.lm_head.weight",
    "whisper_adapter.fc_1.weight": "adapter.gate.weight",
    "whisper_adapter.fc_2.weight": "adapter.up.weight",
    "whisper_adapter.proj.weight": "adapter.down.weight",
}


def litgpt_qkv_to_fused(tensor: torch.Tensor, config: OmniConfig) -> torch.Tensor:
    """litgpt's grouped q/k/v (per group: its queries, its key, its value) -> [q; k; v]."""
    rest = tensor.shape[1:]
    grouped = tensor.reshape(config.n_query_groups, config.q_per_kv + 2, config.head_size, *rest)
    q = grouped[:, : config.q_per_kv].reshape(-1, *rest)
    k = grouped[:, config.q_per_kv].reshape(-1, *rest)
    v = grouped[:, config.q_per_kv + 1].reshape(-1, *rest)
    return torch.cat((q, k, v))


def fused_qkv_to_litgpt(tensor: torch.Tensor, config: OmniConfig) -> torch.Tensor:
    """Inverse of :func:`litgpt_qkv_to_fused`."""
    rest = tensor.shape[1:]
    hs, n_kv = config.head_size, config.n_query_groups
    q, k, v = tensor.split((config.n_head * hs, n_kv * hs, n_kv * hs))
    q = q.reshape(n_kv, config.q_per_kv, hs, *rest)
    k = k.reshape(n_kv, 1, hs, *rest)
    v = v.reshape(n_kv, 1, hs, *rest)
    return torch.cat((q, k, v), dim=1).reshape(-1, *rest)


def litgpt_to_state_dict(litgpt: dict[str, torch.Tensor], config: OmniConfig) -> dict[str, torch.Tensor]:
    """Rename (and regroup q/k/v of) a litgpt ``lit_model.pth`` state dict into OmniModel names."""
    if "model" in litgpt and isinstance(litgpt["model"], dict):
        litgpt = litgpt["model"]
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in litgpt.items():
        if key in _LITGPT_TOP:
            state[_LITGPT_TOP[key]] = tensor
            continue
        parts = key.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["transformer", "h"] and parts[2].isdigit():
            prefix = f"llm.layers.{parts[2]}."
            name = parts[3]
            if name in ("attn.attn.weight", "attn.attn.bias"):
                if tensor.shape[0] != config.qkv_size:
                    raise CheckpointError(
                        f"lit_model.pth: {key} has {tensor.shape[0]} rows but model_config.yaml needs "
                        f"{config.qkv_size} ((n_head + 2 * n_query_groups) * head_size); the config does not "
                        f"fit the weights. Re-download both with `miniomni download`."
                    )
                state[prefix + "attn.qkv." + name.rsplit(".", 1)[1]] = litgpt_qkv_to_fused(tensor, config)
                continue
            if name in _LITGPT_LAYER:
                state[prefix + _LITGPT_LAYER[name]] = tensor
                continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"lit_model.pth holds tensors this model does not have: {', '.join(unknown[:5])}"
            f"{' …' if len(unknown) > 5 else ''}; is it a Mini-Omni checkpoint with the matching model_config.yaml?"
        )
    if config.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)
    return state


def state_dict_to_litgpt(state: dict[str, torch.Tensor], config: OmniConfig) -> dict[str, torch.Tensor]:
    """OmniModel state dict -> litgpt names and layout (what the reference implementation loads)."""
    top = {ours: theirs for theirs, ours in _LITGPT_TOP.items()}
    layer = {ours: theirs for theirs, ours in _LITGPT_LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in top:
            out[top[key]] = tensor
            continue
        parts = key.split(".", 3)  # llm.layers.N.rest
        index, name = parts[2], parts[3]
        prefix = f"transformer.h.{index}."
        if name.startswith("attn.qkv."):
            out[prefix + "attn.attn." + name.rsplit(".", 1)[1]] = fused_qkv_to_litgpt(tensor, config)
        else:
            out[prefix + layer[name]] = tensor
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse missing, unexpected or mis-shaped tensors with a message naming them."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    llm = getattr(model, "llm", None)
    if llm is not None and llm.lm_head.weight is llm.embed.weight:
        expected.pop("llm.lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:4])}{' …' if len(unexpected) > 4 else ''}")
    if wrong:
        k = wrong[0]
        problems.append(f"{k} has shape {tuple(state[k].shape)}, the config needs {tuple(expected[k])}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit its model config: {'; '.join(problems)}. Check that the config and "
            f"weights belong together (re-download with `miniomni download`)."
        )


# ------------------------------------------------------------------------ directory


def read_checkpoint_dir(directory: str | Path) -> CheckpointParts:
    """Read the published layout; every missing or broken file is named with its fix."""
    directory = Path(directory)
    fix = _fix_hint(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist; {fix}")
    config_path = directory / "model_config.yaml"
    if not config_path.is_file():
        raise CheckpointError(f"model config not found: {config_path} is missing; {fix}")
    config = OmniConfig.from_yaml(config_path)

    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise CheckpointError(f"tokenizer not found: {tokenizer_path} is missing; {fix}")
    tokenizer_json = tokenizer_path.read_text(encoding="utf-8")

    whisper_path = directory / WHISPER_FILE
    if not whisper_path.is_file() and is_ct2_dir(directory / "whisper"):
        whisper_path = directory / "whisper"  # a CTranslate2 Whisper directory in place of small.pt
    elif not whisper_path.is_file() and OPENAI_WHISPER_CACHE.is_file():
        log.info("using the Whisper encoder from %s", OPENAI_WHISPER_CACHE)
        whisper_path = OPENAI_WHISPER_CACHE
    whisper_dims, whisper_state = read_whisper_file(whisper_path, fix)

    snac_dir = directory / SNAC_DIR
    snac_config_path = snac_dir / "config.json"
    if not snac_config_path.is_file():
        raise CheckpointError(f"SNAC codec config not found: {snac_config_path} is missing; {fix}")
    try:
        snac_config = json.loads(snac_config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{snac_config_path} is not valid JSON ({exc}); delete it and {fix}") from exc
    snac_state = load_torch_file(snac_dir / "pytorch_model.bin", "SNAC codec weights", fix)

    litgpt = load_torch_file(directory / "lit_model.pth", "Mini-Omni weights", fix)
    if not isinstance(litgpt, dict):
        raise CheckpointError(f"{directory / 'lit_model.pth'} does not hold a state dict; {fix}")
    model_state = litgpt_to_state_dict(litgpt, config)
    return CheckpointParts(config, model_state, whisper_dims, whisper_state, snac_config, snac_state, tokenizer_json,
                           weights_file=directory / "lit_model.pth")


def read_whisper_file(path: Path, fix: str) -> tuple[WhisperDims, dict[str, torch.Tensor]]:
    """Dimensions and encoder weights of an openai-whisper checkpoint (``small.pt``) or a CTranslate2 Whisper dir."""
    path = Path(path)
    data = whisper_checkpoint_from_ct2(path) if is_ct2_dir(path) else load_torch_file(path, "Whisper checkpoint", fix)
    return encoder_state_dict_from_whisper(data, source=f"Whisper checkpoint '{path}'")


def download(directory: str | Path, revision: str | None = None) -> Path:
    """Fetch the published files into ``directory`` (published layout). Needs internet."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CheckpointError("huggingface_hub is not installed; pip install huggingface_hub") from exc
    plan = [(MINI_OMNI_REPO, name, directory) for name in MINI_OMNI_FILES]
    plan.append((WHISPER_REPO, WHISPER_FILE, directory))
    plan += [(SNAC_REPO, name, directory / SNAC_DIR) for name in SNAC_FILES]
    for repo_id, filename, target in plan:
        if (target / filename).is_file():
            log.info("%s already present", target / filename)
            continue
        if not host_resolves():
            raise CheckpointError(
                f"cannot reach the Hugging Face Hub to download {filename} from {repo_id}: its host name does "
                f"not resolve, so this machine looks offline. " + manual_download_hint(directory, plan)
            )
        log.info("downloading %s from %s into %s", filename, repo_id, target)
        try:
            hf_hub_download(repo_id=repo_id, filename=filename, local_dir=target,
                            revision=revision if repo_id == MINI_OMNI_REPO else None)
        except Exception as exc:  # huggingface_hub raises many types (offline, HTTP, timeouts)
            raise CheckpointError(
                f"could not download {filename} from the Hugging Face Hub repo {repo_id} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                "This machine may be offline or unable to reach huggingface.co. "
                + manual_download_hint(directory, plan)
            ) from exc
    return directory


def resolve_repo(repo_id: str) -> Path:
    """A hub repo id -> a local directory in the published layout (downloaded on first use)."""
    if repo_id != MINI_OMNI_REPO:
        raise CheckpointError(
            f"{repo_id!r} is neither a local path nor a known hub repo; use a checkpoint directory, "
            f"a .safetensors bundle, or {MINI_OMNI_REPO!r}"
        )
    cache = Path(os.environ.get("MINIOMNI_CACHE", Path.home() / ".cache" / "miniomni")) / repo_id.replace("/", "--")
    return download(cache)


# ---------------------------------------------------------------------- safetensors bundle


def convert_model_state(
    state: dict[str, torch.Tensor],
    config: OmniConfig,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    mapped_from: Path | None = None,
    calibration: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype``; with ``quantize="int8"`` store the decoder's linears as int8 + scales.

    ``calibration`` (token ids, see :mod:`miniomni.calibration`) smooths each block before it is
    quantized and records its outlier channels (:mod:`miniomni.smoothing`). With ``mapped_from``
    (the file the tensors are memory-mapped from), each source tensor's pages are released once
    converted, so peak memory stays near the converted size.
    """
    from .safeload import mapped_ranges, release_pages
    from .smoothing import smoothed_blocks

    ranges = mapped_ranges(mapped_from) if mapped_from is not None else []
    quantize = parse_quantize(quantize)
    linear_weights: set[str] = set()
    if quantize == "int8":
        with torch.device("meta"):
            model = OmniModel(config)
        linear_weights = {f"llm.{name}.weight" for name, module in model.llm.named_modules()
                          if isinstance(module, torch.nn.Linear)}
    out: dict[str, torch.Tensor] = {}
    if quantize == "int8" and config.tie_word_embeddings:
        out["llm.lm_head.weight"], out["llm.lm_head.scales"] = quantize_weight(state["llm.embed.weight"])
    smoothed = smoothed_blocks(state, config, calibration) if quantize == "int8" and calibration is not None else ()
    for key, tensor in itertools.chain(smoothed, state.items()):
        if key in out:
            continue
        if key in linear_weights:
            out[key], out[key[: -len("weight")] + "scales"] = quantize_weight(tensor)
        elif dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            out[key] = tensor.to(dtype)
        elif tensor is state.get(key):
            out[key] = tensor  # kept as it is: its pages stay in use
            continue
        else:
            out[key] = tensor
        if key in state:
            release_pages(state[key], ranges)
    return out


def write_bundle(
    parts: CheckpointParts, path: str | Path, dtype: torch.dtype | None = None, quantize: str | None = None
) -> Path:
    """Write everything into one ``.safetensors`` file, atomically (temp file, then rename).

    ``dtype`` casts the model's floating weights (e.g. bfloat16 halves the file); ``quantize="int8"``
    stores the decoder's linear layers as int8 with per-row scales (a quarter of float32), so loading
    in that mode never holds float32 weights.
    """
    from safetensors.torch import save_file

    path = Path(path)
    quantize = parse_quantize(quantize) or parts.quantize
    model_state = parts.model_state
    if quantize == "int8" and dtype is None:
        dtype = torch.bfloat16  # int8 models keep their other tensors in bfloat16 (see MiniOmni.from_parts)
    if dtype is not None or quantize != parts.quantize:
        if parts.quantize:
            raise CheckpointError("this bundle is already quantized; convert from the published checkpoint instead")
        calibration = calibration_ids(parts.tokenizer_json) if quantize == "int8" else None
        model_state = convert_model_state(model_state, parts.config, dtype, quantize, calibration=calibration)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, state in (("omni.", model_state), ("whisper.", parts.whisper_state), ("snac.", parts.snac_state)):
        for key, tensor in state.items():
            tensors[prefix + key] = tensor.detach().contiguous()
    tensors["tokenizer_json"] = torch.frombuffer(bytearray(parts.tokenizer_json.encode("utf-8")), dtype=torch.uint8)
    metadata = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "model_config": json.dumps(parts.config.to_dict()),
        "whisper_dims": json.dumps(parts.whisper_dims.__dict__),
        "snac_config": json.dumps(parts.snac_config),
        "quantize": quantize or "none",
    }
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_bundle(path: str | Path) -> CheckpointParts:
    """Read a bundle written by :func:`write_bundle`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"bundle not found: {path} is missing; create it with `miniomni convert DIR {path}`")
    groups: dict[str, dict[str, torch.Tensor]] = {"omni.": {}, "whisper.": {}, "snac.": {}}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != BUNDLE_FORMAT:
                raise CheckpointError(f"{path} is a safetensors file but not a miniomni bundle; "
                                      "create one with `miniomni convert`")
            tokenizer_json = bytes(handle.get_tensor("tokenizer_json").numpy()).decode("utf-8")
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle has no __iter__
                for prefix, group in groups.items():
                    if key.startswith(prefix):
                        group[key[len(prefix) :]] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} could not be read ({exc}); it is probably incomplete. Delete it and run `miniomni convert` again"
        ) from exc
    config = OmniConfig.from_dict(json.loads(metadata["model_config"]))
    return CheckpointParts(
        config=config,
        model_state=groups["omni."],
        whisper_dims=WhisperDims.from_dict(json.loads(metadata["whisper_dims"])),
        whisper_state=groups["whisper."],
        snac_config=json.loads(metadata["snac_config"]),
        snac_state=groups["snac."],
        tokenizer_json=tokenizer_json,
        quantize=parse_quantize(metadata.get("quantize")),
    )


def read_checkpoint(source: str | Path) -> CheckpointParts:
    """A directory in the published layout, a ``.safetensors`` bundle, or a hub repo id."""
    path = Path(source)
    if path.is_dir():
        return read_checkpoint_dir(path)
    if path.suffix == ".safetensors" or path.is_file():
        return read_bundle(path)
    if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")):
        return read_checkpoint_dir(resolve_repo(source))
    raise CheckpointError(
        f"checkpoint {source} not found: give a directory in the published layout, a .safetensors "
        f"bundle, or the hub id {MINI_OMNI_REPO} (run `miniomni download DIR` first when offline)"
    )


# ------------------------------------------------------------------------ single components


def load_whisper_encoder(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WhisperEncoder:
    """Load the audio encoder from an openai-whisper checkpoint file (e.g. small.pt), in eval mode."""
    path = Path(path)
    dims, state = read_whisper_file(path, "download it again with `miniomni download DIR`")
    encoder = WhisperEncoder.from_state_dict(dims, state, device=device, dtype=dtype, source=f"'{path}'")
    log.info(
        "loaded Whisper encoder from %s: %d layers, width %d, %d heads",
        path,
        dims.n_audio_layer,
        dims.n_audio_state,
        dims.n_audio_head,
    )
    return encoder


def resolve_snac(source: str | Path) -> Path:
    """A ``snac/`` folder, a checkpoint dir holding one, or a miniomni ``.safetensors`` bundle."""
    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    for candidate in (path, path / "snac"):
        if (candidate / "config.json").is_file() and (candidate / "pytorch_model.bin").is_file():
            return candidate
    raise MiniOmniError(
        f"no SNAC codec at {path}: give --snac a folder with config.json + pytorch_model.bin, a checkpoint "
        "directory holding snac/, or a miniomni .safetensors bundle (`miniomni download DIR` fetches one)"
    )


def load_codec(source: str | Path, device: str = "cpu") -> Codec:
    """The SNAC codec alone, from any of the places :func:`resolve_snac` accepts."""
    path = resolve_snac(source)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "snac_config" not in metadata:
                raise MiniOmniError(f"{path} is not a miniomni bundle with a SNAC codec")
            names = [k for k in handle.keys() if k.startswith("snac.")]  # noqa: SIM118 - a safetensors handle
            state = {k[len("snac."):]: handle.get_tensor(k) for k in names}
        return Codec.from_state_dict(json.loads(metadata["snac_config"]), state, device)
    fix = "download it again with `miniomni download DIR`"
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise MiniOmniError(f"{path / 'config.json'} is not valid JSON ({exc}); {fix}") from exc
    state = load_torch_file(path / "pytorch_model.bin", "SNAC codec weights", fix)
    return Codec.from_state_dict(config, state, device)
