"""Training checkpoints and the export of a trained model.

A checkpoint is ``OUT/checkpoints/step-N/`` holding :data:`STATE_FILE` (full, name-keyed model and
optimizer state dicts, scheduler, RNG states, data position) and the recipe. It is written into a
temporary folder and renamed, so a kill never leaves a half-written one, and it resumes exactly,
under DDP, FSDP or one process alike. The export is the published layout plus a safetensors bundle.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..checkpoints import CheckpointParts, state_dict_to_litgpt, write_bundle
from ..errors import MiniOmniError
from ..safeload import load_torch_file
from .distributed import state_options

if TYPE_CHECKING:
    from .dataplan import DataPlan

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / STATE_FILE).is_file()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes."""
    return output_dir / "checkpoints" / f"step-{step:08d}"


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, on the CPU; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=state_options(cpu_offload=True))


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch and CUDA RNG states, in a form that loads with ``weights_only=True``."""
    return {
        "python": random.getstate(),
        "numpy": _numpy_rng_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(rng["python"])
    np.random.set_state(_numpy_rng_from_plain(rng["numpy"]))
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def write_checkpoint(output_dir: Path, step: int, state: dict[str, Any], recipe_yaml: str, keep: int) -> Path:
    """Write ``checkpoints/step-N`` atomically (temp folder, then rename); keep only the newest ``keep``."""
    target = checkpoint_dir(output_dir, step)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / STATE_FILE)
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The training state saved in checkpoint folder ``path``."""
    return load_torch_file(path / STATE_FILE, "training checkpoint",
                           "delete that checkpoint folder to resume from the one before it")


def check_resumable(state: dict[str, Any], path: Path, plan: DataPlan, trainable: list[str], world_size: int) -> None:
    """Refuse a checkpoint whose data position or trained tensors this run does not have; say what changes."""
    before = state.get("micro_batches_per_step")
    changed = before is not None and before != plan.per_step
    if plan.position(int(state["step"])) != (state["epoch"], state["batch_index"]):
        what = (f"{before} micro-batches per step (ranks x grad_accum), now {plan.per_step}" if changed
                else "a different batching")
        raise MiniOmniError(f"checkpoint {path} was written with {what}, so its data position does not exist "
                            "in this run; resume with the ranks, grad_accum and batching it was written with")
    saved_names = state.get("trainable_names")
    if saved_names is not None and sorted(saved_names) != sorted(trainable):
        raise MiniOmniError(f"checkpoint {path} was written by a run that trained other tensors "
                            f"({len(saved_names)}) than this recipe selects ({len(trainable)}); resume with "
                            "the `train` patterns it was written with, or start a new output_dir from its export")
    if changed:
        log.warning("resuming a run of %d micro-batches per step (ranks x grad_accum) with %d: the global "
                    "batch and the data order change from here on", before, plan.per_step)
    elif state.get("world_size", 1) != world_size:
        log.info("resuming a %d-rank run on %d ranks with the same %d micro-batches per step: every step "
                 "sees the micro-batches it would have", state.get("world_size", 1), world_size, plan.per_step)


def load_model_and_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                             path: Path) -> None:
    """Load a checkpoint's full model and optimizer state dicts into the (possibly sharded) model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    optimizer_state = state["optimizer"]
    if any(isinstance(key, int) for key in optimizer_state.get("state", {})):
        raise MiniOmniError(f"checkpoint {path} stores its optimizer state by parameter index (an older "
                            "miniomni); resume it with that version, or start a new output_dir")
    set_model_state_dict(model, state["model"], options=state_options())
    # A trained parameter that has had no gradient yet has no AdamW state; loading fills one in
    # (step 1, zeros), which the uninterrupted run would not have: drop it again.
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=state_options(strict=False))
    saved = set(optimizer_state.get("state", {}))
    for name, param in model.named_parameters():
        if param.requires_grad and name not in saved:
            optimizer.state.pop(param, None)


def _numpy_rng_to_plain(state: tuple) -> tuple:
    """NumPy's RNG state with its key array as a tensor, so the checkpoint loads with weights_only=True."""
    name, keys, position, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)


def _numpy_rng_from_plain(state: tuple) -> tuple:
    name, keys, position, has_gauss, cached = state
    return name, np.asarray(keys.numpy(), dtype=np.uint32), position, has_gauss, cached


# ----------------------------------------------------------------------------- export


def export_weights(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Float32 CPU copies of a full model state dict, without the head when it is tied to the embedding."""
    state = {k: v.detach().cpu().float() for k, v in state.items()}
    if tied:
        state.pop("llm.lm_head.weight", None)
    return state


def export_layout(directory: Path, parts: CheckpointParts, weights: dict[str, torch.Tensor], source: Path) -> Path:
    """The published layout (``miniomni generate --checkpoint DIR`` loads it), written atomically.

    ``weights`` come from :func:`export_weights`; Whisper and SNAC are copied from ``source`` when it
    is a directory holding them, else written from ``parts``.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "snac").mkdir(parents=True)
    config = parts.config
    config.to_yaml(tmp / "model_config.yaml")
    torch.save(state_dict_to_litgpt(weights, config), tmp / "lit_model.pth")
    (tmp / "tokenizer.json").write_text(parts.tokenizer_json, encoding="utf-8")
    if source.is_dir() and (source / "small.pt").is_file():
        shutil.copy2(source / "small.pt", tmp / "small.pt")
    else:
        whisper = {"encoder." + k: v for k, v in parts.whisper_state.items()}
        torch.save({"dims": dict(parts.whisper_dims.__dict__), "model_state_dict": whisper}, tmp / "small.pt")
    if source.is_dir() and (source / "snac").is_dir():
        for name in ("config.json", "pytorch_model.bin"):
            shutil.copy2(source / "snac" / name, tmp / "snac" / name)
    else:
        (tmp / "snac" / "config.json").write_text(json.dumps(parts.snac_config))
        torch.save(parts.snac_state, tmp / "snac" / "pytorch_model.bin")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def export_bundle(path: Path, parts: CheckpointParts, weights: dict[str, torch.Tensor]) -> Path:
    """The same as one ``.safetensors`` bundle, with ``weights`` from :func:`export_weights`."""
    p = parts
    return write_bundle(CheckpointParts(p.config, weights, p.whisper_dims, p.whisper_state, p.snac_config,
                                        p.snac_state, p.tokenizer_json), path)
