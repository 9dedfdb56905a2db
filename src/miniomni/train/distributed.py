"""Training on several processes under ``torchrun``: the process group, DDP and FSDP, and what the ranks share.

Every function here also works with one process, where it does nothing collective.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..models.omni import OmniModel

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions


@dataclass
class DistInfo:
    """This process's place among the ranks (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0, the one that writes files."""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """From torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK): gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


def shard_model(model: OmniModel, device: torch.device, world_size: int) -> None:
    """FSDP2 in place: each decoder block is its own unit, the root holds the rest (embeddings, head, norm, adapter).

    Parameters become DTensors sharded on dim 0 over a 1-D mesh of all ranks, moved to ``device``
    unit by unit (a unit is unsharded only while it runs).
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.llm.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The audio logits are a view (unflatten); the loss never changes them in place, so the
    # warning FSDP gives for every view output does not apply.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


class DDPModel:
    """A DDP module that still exposes ``.llm`` (the loss reads the device from it)."""

    def __init__(self, ddp: torch.nn.Module, model: OmniModel) -> None:
        self.ddp = ddp
        self.llm = model.llm

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce of the backward passes inside it."""
        return self.ddp.no_sync()


def wrap_ddp(model: OmniModel, device: torch.device) -> DDPModel:
    """DDP around ``model``; unused parameters allowed, since text-only batches leave the adapter unused."""
    from torch.nn.parallel import DistributedDataParallel

    return DDPModel(DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True), model)


def state_options(**kwargs: Any) -> StateDictOptions:
    """``StateDictOptions`` for full (unsharded) state dicts, whatever the mode."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model: OmniModel, info: DistInfo, fsdp: bool, tied: bool) -> dict[str, torch.Tensor]:
    """The whole model state dict on the CPU, on rank 0 (other ranks get {}); under FSDP every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not fsdp:  # every rank holds the whole model; only rank 0 writes
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if info.main else {}
    state = get_model_state_dict(model, options=state_options(cpu_offload=True))
    if tied and "llm.lm_head.weight" in state:
        state["llm.lm_head.weight"] = state["llm.embed.weight"]  # gathered twice; stored once
    return state


def barrier(info: DistInfo) -> None:
    """Wait for every rank (nothing to wait for with one process)."""
    if info.enabled:
        dist.barrier()


def sum_over_ranks(values: torch.Tensor, info: DistInfo, device: torch.device) -> torch.Tensor:
    """All-reduce (sum) a small CPU tensor; nccl needs it on the rank's GPU, gloo on the CPU."""
    if not info.enabled:
        return values
    on_device = values.to(device) if device.type == "cuda" else values
    dist.all_reduce(on_device)
    return on_device.cpu()


def backward_plan(audio: list[bool], trainable: list[str], info: DistInfo, device: torch.device
                  ) -> tuple[list[bool], list[bool]]:
    """(backward, keep_adapter) per micro-batch of a step, the same pattern on every rank.

    ``audio`` says which of this rank's micro-batches have audio input. Every forward runs the
    whole decoder; the adapter only runs for audio input. So with only the adapter trained, a
    micro-batch gets a backward when some rank's micro-batch at that position has audio. Where
    the adapter trains and some ranks have audio at a position but this one does not,
    ``keep_adapter`` puts the adapter in this rank's graph (a zero gradient): DDP and FSDP need
    the same gradients on every rank, or the reductions fail.
    """
    counts = [int(a) for a in audio]
    if info.enabled:
        counts = [int(v) for v in sum_over_ranks(torch.tensor(counts, dtype=torch.int64), info, device)]
    adapter_trains = any(name.startswith("adapter.") for name in trainable)
    adapter_only = all(name.startswith("adapter.") for name in trainable)
    backward = [not adapter_only or count > 0 for count in counts]
    keep = [info.enabled and adapter_trains and count > 0 and not has for count, has in zip(counts, audio, strict=True)]
    return backward, keep
