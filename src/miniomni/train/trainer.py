"""The training loop of issue 5 ("Any Model Can Talk"): one process or many under ``torchrun`` (DDP or FSDP).

* AdamW over the parameters the recipe's glob patterns select (everything else frozen, the
  Whisper encoder always), linear warmup then cosine to ``schedule.min_lr`` (LambdaLR);
* gradient accumulation, clipping, optional bf16 autocast and activation checkpointing
  (``torch.utils.checkpoint`` around each decoder block);
* data: every source is read and collated once (Whisper features through
  :class:`features.FeatureCache`), grouped into micro-batches by :func:`collate.bucket_by_length`;
  an epoch is a seeded permutation of the micro-batches; optimizer step s of an epoch uses
  micro-batches ``s*W*A .. (s+1)*W*A - 1`` of it (W ranks, A accumulation steps), rank r the
  ones ``r, r+W, ...`` — disjoint slices, and W ranks x A steps see the same micro-batches as one
  process with W*A accumulation steps (the gradients agree up to float rounding);
* ``distributed: fsdp`` shards parameters, gradients and optimizer state over the ranks
  (``fully_shard`` on each decoder block, then on the whole model), for backbones whose training
  state does not fit one device;
* checkpoints (atomic: temp dir, then rename) with the model, optimizer, scheduler, RNG states
  and data position, so a killed run resumes exactly; model and optimizer are stored as full,
  name-keyed state dicts whatever the mode, so a checkpoint resumes under DDP, FSDP or one process;
* a validation loss over held-out examples (``data.validation`` sources and/or a seeded
  ``data.validation_split``) every ``eval_every`` steps;
* logs: JSONL, TensorBoard, a tqdm bar (rank 0) and a loss-curve PNG; at the end an export in
  the published layout plus a safetensors bundle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoints import (
    CheckpointParts,
    read_checkpoint,
    state_dict_to_litgpt,
    write_bundle,
)
from ..data.jsonl import read_jsonl
from ..data.librispeech import read_librispeech
from ..data.voiceassistant import read_voiceassistant
from ..devices import resolve_device
from ..errors import MiniOmniError
from ..models.omni import OmniModel
from ..safeload import load_torch_file
from ..tokens import Task
from .collate import TrainingExample, bucket_by_length, collate_batch, collate_record
from .features import FeatureCache
from .loss import STREAMS
from .loss import loss as batch_loss
from .recipe import Recipe, select_trainable

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
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
    # The audio logits are a view (unflatten); loss.loss never changes them in place, so the
    # warning FSDP gives for every view output does not apply.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def _state_options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


# ----------------------------------------------------------------------------- schedule


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at step ``total``."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------- activation checkpointing


def enable_activation_checkpointing(model: OmniModel) -> None:
    """Recompute each decoder block in the backward pass (names and state dict unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.llm.layers:
        if getattr(block, "_checkpointed", False):
            continue
        original = block.forward

        def forward(*args, _original=original):
            if torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False)
            return _original(*args)

        block.forward = forward
        block._checkpointed = True


# ----------------------------------------------------------------------------- data


def _source_records(sources: list) -> Iterator:
    """The records of each source in order (at most ``limit`` each), with the source's task applied."""
    for source in sources:
        if source.kind == "voiceassistant":
            records = read_voiceassistant(source.path, task=source.task or "A1A2")
        elif source.kind == "librispeech":
            records = read_librispeech(source.path)
        else:
            records = read_jsonl(source.path)
        for count, record in enumerate(records):
            if source.limit is not None and count >= source.limit:
                break
            if source.task and source.kind != "voiceassistant":
                record.task = Task.parse(source.task)
            yield record


def load_examples(recipe: Recipe, parts: CheckpointParts, encode: Callable | None,
                  sources: list | None = None, dist_info: DistInfo | None = None) -> list[TrainingExample]:
    """Read every source (the recipe's training sources by default), collate every record (Whisper features via a FeatureCache).

    With several ranks and a feature cache folder, each rank first fills the cache for every W-th
    record, so the Whisper work is split over the ranks rather than repeated on each.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(parts.tokenizer_json)
    sources = recipe.data.sources if sources is None else sources
    features = None
    if encode is not None:
        # With a cache folder the examples hold CachedFeatures: features are read per batch, not kept in memory.
        features = FeatureCache(encode, recipe.data.feature_cache, namespace=f"whisper:{recipe.model}",
                                        lazy=True)
        if dist_info is not None and dist_info.enabled and recipe.data.feature_cache:
            for index, record in enumerate(_source_records(sources)):
                if index % dist_info.world_size == dist_info.rank and Task.parse(record.task).audio_input:
                    features(record.question_audio)
            dist.barrier()
    examples = [collate_record(record, tokenizer, features, recipe.data.mask_audio_padding)
                for record in _source_records(sources)]
    if not examples:
        raise MiniOmniError("the recipe's data sources yielded no examples")
    return examples


def split_validation(examples: list[TrainingExample], fraction: float, seed: int
                     ) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(training, held out): a seeded ``fraction`` of the examples (at least one when fraction > 0) held out."""
    if fraction <= 0:
        return examples, []
    count = max(1, round(fraction * len(examples)))
    if count >= len(examples):
        raise MiniOmniError(f"data.validation_split={fraction} would hold out all {len(examples)} examples; "
                            "lower it or add data")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


class DataPlan:
    """Deterministic micro-batch order: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, batches: list[list[TrainingExample]], seed: int, world: int, accum: int, shuffle: bool) -> None:
        self.batches = batches
        self.seed = seed
        self.world = world
        self.accum = accum
        self.shuffle = shuffle
        self.per_step = world * accum
        self.steps_per_epoch = len(batches) // self.per_step
        if self.steps_per_epoch < 1:
            raise MiniOmniError(
                f"{len(batches)} micro-batches cannot fill one step of {world} rank(s) x {accum} accumulation "
                "step(s); add data, lower data.batch_tokens or data.grad_accum"
            )
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(len(self.batches), generator=generator).tolist()
            else:
                order = list(range(len(self.batches)))
            self._order = (epoch, order)
        return self._order[1]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step index within the epoch) of optimizer step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def micro_batches(self, step: int, rank: int) -> list[list[TrainingExample]]:
        epoch, index = self.position(step)
        group = self.order(epoch)[index * self.per_step : (index + 1) * self.per_step]
        return [self.batches[i] for i in group[rank :: self.world]]


# ----------------------------------------------------------------------------- trainer


class _Wrapped:
    """A DDP module that still exposes ``.llm`` (loss.loss reads the device from it)."""

    def __init__(self, ddp: torch.nn.Module, model: OmniModel) -> None:
        self.ddp = ddp
        self.llm = model.llm

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def no_sync(self):
        return self.ddp.no_sync()


@dataclass
class StepRecord:
    step: int
    loss: float
    parts: dict[str, float]
    lr: float
    tokens: int
    tokens_per_s: float
    epoch: int = 0
    batch_index: int = 0
    val_loss: float | None = None  # set on evaluation steps
    val_parts: dict[str, float] | None = None

    def as_json(self) -> dict[str, Any]:
        row = {"step": self.step, "loss": self.loss, **{f"loss_{k}": v for k, v in self.parts.items()},
               "lr": self.lr, "tokens": self.tokens, "tokens_per_s": self.tokens_per_s,
               "epoch": self.epoch, "batch_index": self.batch_index}
        if self.val_loss is not None:
            row["val_loss"] = self.val_loss
            row.update({f"val_loss_{k}": v for k, v in (self.val_parts or {}).items()})
        return row


@dataclass
class Trainer:
    """Build with a :class:`Recipe`; :meth:`fit` trains (resuming from ``output_dir`` if it holds a checkpoint)."""

    recipe: Recipe
    resume: bool | None = None  # None: resume when output_dir has a checkpoint; False: refuse to overwrite one
    on_step: Callable[[StepRecord], None] | None = None  # called after every optimizer step (may raise)
    progress: bool = True
    history: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        recipe = self.recipe
        from ..pipeline import MiniOmni

        self.device = resolve_device(recipe.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.fsdp = recipe.distributed == "fsdp" and self.dist.enabled
        if recipe.distributed == "fsdp" and not self.dist.enabled:
            log.info("distributed: fsdp shards over torchrun ranks; one process trains unsharded")
        self.output_dir = Path(recipe.output_dir)
        self.parts = read_checkpoint(recipe.model)
        # Under FSDP the decoder is built on the CPU; fully_shard moves each rank's shards to the device.
        omni = MiniOmni.from_parts(self.parts, torch.device("cpu") if self.fsdp else self.device, torch.float32)
        if self.fsdp and self.device.type != "cpu":
            omni.encoder.to(self.device)
            omni.device = self.device
        self.omni = omni
        model = omni.model
        if not self.fsdp:  # own storage (the loaded tensors may be memory-mapped); FSDP copies each shard anyway
            for param in model.parameters():
                param.data = param.data.clone()
        names = [n for n, _ in model.named_parameters()]
        self.trainable = select_trainable(names, recipe.train)
        for name, param in model.named_parameters():
            param.requires_grad_(name in self.trainable)
        omni.encoder.requires_grad_(False)
        self.frozen = [n for n in names if n not in self.trainable]
        count = sum(p.numel() for n, p in model.named_parameters() if n in self.trainable)
        total = sum(p.numel() for p in model.parameters())
        self.trainable_count = count
        if self.dist.main:
            log.info("training %d of %d parameters (%d tensors): %s", count, total, len(self.trainable),
                     ", ".join(self.trainable))
        if recipe.activation_checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        self.model = model
        self.ddp_model: Any = model
        if self.fsdp:  # the sharded module is called directly
            shard_model(model, self.device, self.dist.world_size)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp_model = _Wrapped(DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True), model)
        self._release_source_weights()
        params = [p for n, p in model.named_parameters() if n in self.trainable]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        o = recipe.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas, eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(recipe.schedule.warmup_steps, recipe.steps, recipe.schedule.min_lr / o.lr))
        all_sources = [*recipe.data.sources, *recipe.data.validation]
        needs_audio = any(s.kind == "librispeech" or Task.parse(
            s.task or ("A1A2" if s.kind == "voiceassistant" else "T1T2")).audio_input for s in all_sources)
        encode = omni.encode_audio if needs_audio else None
        examples, held_out = split_validation(load_examples(recipe, self.parts, encode, dist_info=self.dist),
                                              recipe.data.validation_split, recipe.seed)
        if recipe.data.validation:
            held_out += load_examples(recipe, self.parts, encode, recipe.data.validation, self.dist)
        self.val_batches = bucket_by_length(held_out, recipe.data.batch_tokens, recipe.data.max_batch_size)
        batches = bucket_by_length(examples, recipe.data.batch_tokens, recipe.data.max_batch_size)
        self.plan = DataPlan(batches, recipe.seed, self.dist.world_size, recipe.data.grad_accum, recipe.data.shuffle)
        self.step = 0

    def _release_source_weights(self) -> None:
        """The model owns its weights now: drop the loaded ones (and their memory-mapped pages)."""
        from ..safeload import mapped_ranges, release_pages

        ranges = mapped_ranges(self.parts.weights_file) if self.parts.weights_file is not None else []
        if ranges:
            for tensor in self.parts.model_state.values():
                release_pages(tensor, ranges)
        self.parts.model_state = {}

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dirs(self) -> list[Path]:
        root = self.output_dir / "checkpoints"
        if not root.is_dir():
            return []
        dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / STATE_FILE).is_file()]
        return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes ``checkpoints/step-N`` atomically; every rank waits for it."""
        target = self.output_dir / "checkpoints" / f"step-{self.step:08d}"
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        # Collective under FSDP (every rank takes part; rank 0 receives the full tensors).
        model_state = self.full_model_state()
        optimizer_state = {}
        if self.fsdp or self.dist.main:  # a collective under FSDP; otherwise only rank 0 needs it
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer,
                                                       options=_state_options(cpu_offload=True))
        if self.dist.main:
            epoch, index = self.plan.position(self.step)
            state = {
                "step": self.step,
                "epoch": epoch,
                "batch_index": index,
                "model": model_state,
                "trainable_names": self.trainable,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "rng": {
                    "python": random.getstate(),
                    "numpy": _numpy_rng_to_plain(np.random.get_state()),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
                "world_size": self.dist.world_size,
                "micro_batches_per_step": self.plan.per_step,
                "recipe": self.recipe.to_dict(),
            }
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(state, tmp / STATE_FILE)
            (tmp / "recipe.yaml").write_text(self.recipe.to_yaml())
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            for old in self.checkpoint_dirs()[: -self.recipe.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return target

    def load_checkpoint(self, path: Path) -> None:
        state = load_torch_file(path / STATE_FILE, "training checkpoint",
                                "delete that checkpoint folder to resume from the one before it")
        before = state.get("micro_batches_per_step")
        changed = before is not None and before != self.plan.per_step
        if self.plan.position(int(state["step"])) != (state["epoch"], state["batch_index"]):
            what = (f"{before} micro-batches per step (ranks x grad_accum), now {self.plan.per_step}" if changed
                    else "a different batching")
            raise MiniOmniError(f"checkpoint {path} was written with {what}, so its data position does not exist "
                                "in this run; resume with the ranks, grad_accum and batching it was written with")
        saved_names = state.get("trainable_names")
        if saved_names is not None and sorted(saved_names) != sorted(self.trainable):
            raise MiniOmniError(f"checkpoint {path} was written by a run that trained other tensors "
                                f"({len(saved_names)}) than this recipe selects ({len(self.trainable)}); resume with "
                                "the `train` patterns it was written with, or start a new output_dir from its export")
        if changed:
            log.warning("resuming a run of %d micro-batches per step (ranks x grad_accum) with %d: the global "
                        "batch and the data order change from here on", before, self.plan.per_step)
        elif state.get("world_size", 1) != self.dist.world_size:
            log.info("resuming a %d-rank run on %d ranks with the same %d micro-batches per step: every step "
                     "sees the micro-batches it would have", state.get("world_size", 1), self.dist.world_size,
                     self.plan.per_step)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        optimizer_state = state["optimizer"]
        if any(isinstance(key, int) for key in optimizer_state.get("state", {})):
            raise MiniOmniError(f"checkpoint {path} stores its optimizer state by parameter index (an older "
                                "miniomni); resume it with that version, or start a new output_dir")
        set_model_state_dict(self.model, state["model"], options=_state_options())
        # A trained parameter that has had no gradient yet has no AdamW state; loading fills one in
        # (step 1, zeros), which the uninterrupted run would not have: drop it again.
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=_state_options(strict=False))
        saved = set(optimizer_state.get("state", {}))
        for name, param in self.model.named_parameters():
            if param.requires_grad and name not in saved:
                self.optimizer.state.pop(param, None)
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(_numpy_rng_from_plain(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])
        if self.dist.main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, state["epoch"],
                     state["batch_index"])

    # ------------------------------------------------------------------ loop

    def _barrier(self) -> None:
        if self.dist.enabled:
            dist.barrier()

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a small CPU tensor; nccl needs it on the rank's GPU, gloo on the CPU."""
        if not self.dist.enabled:
            return values
        on_device = values.to(self.device) if self.device.type == "cuda" else values
        dist.all_reduce(on_device)
        return on_device.cpu()

    def _backward_plan(self, micro: list[list[TrainingExample]]) -> tuple[list[bool], list[bool]]:
        """(backward, keep_adapter) per micro-batch of this step, the same pattern on every rank.

        Every forward runs the whole decoder; the adapter only runs for audio input. So with only
        the adapter trained, a micro-batch gets a backward when some rank's micro-batch at that
        position has audio. Where the adapter trains and some ranks have audio at a position but
        this one does not, ``keep_adapter`` puts the adapter in this rank's graph (a zero
        gradient): DDP and FSDP need the same gradients on every rank, or the reductions fail.
        """
        audio = [any(e.audio_features is not None for e in examples) for examples in micro]
        counts = [int(a) for a in audio]
        if self.dist.enabled:
            counts = [int(v) for v in self._sum_over_ranks(torch.tensor(counts, dtype=torch.int64))]
        adapter_trains = any(name.startswith("adapter.") for name in self.trainable)
        adapter_only = all(name.startswith("adapter.") for name in self.trainable)
        backward = [not adapter_only or count > 0 for count in counts]
        keep = [self.dist.enabled and adapter_trains and count > 0 and not has
                for count, has in zip(counts, audio)]
        return backward, keep

    def _reshard(self) -> None:
        """After a forward without backward, FSDP leaves the root's gathered weights in place; drop them so
        later forwards gather the updated shards (and the memory is freed)."""
        if self.fsdp:
            self.model.reshard()

    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict[str, float]] | None:
        """The validation loss (mean over the held-out micro-batches, as the training loss) and its parts.

        Under DDP/FSDP every rank must call it (the forwards and the sums are collective).
        """
        if not self.val_batches:
            return None
        world, rank = self.dist.world_size, self.dist.rank
        sums = torch.zeros(len(STREAMS) + 2, dtype=torch.float64)  # total, the streams, the batch count
        for start in range(0, len(self.val_batches), world):
            index = start + rank
            real = index < len(self.val_batches)
            # A rank without a batch in this round still runs one (FSDP needs every rank in each forward).
            batch = collate_batch(self.val_batches[index if real else 0])
            with self._autocast():
                value, parts = batch_loss(self.ddp_model, batch, return_parts=True)
            if real:
                sums += torch.tensor([float(value), *(float(parts[k]) for k in STREAMS), 1.0], dtype=torch.float64)
        self._reshard()
        sums = self._sum_over_ranks(sums)
        count = float(sums[-1])
        return float(sums[0]) / count, {k: float(v) / count for k, v in zip(STREAMS, sums[1:-1].tolist())}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.recipe.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> StepRecord:
        began = time.perf_counter()
        micro = self.plan.micro_batches(self.step, self.dist.rank)
        accum = len(micro)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        parts_sum = {k: 0.0 for k in STREAMS}
        tokens = 0
        backward, keep_adapter = self._backward_plan(micro)
        last = max((i for i, b in enumerate(backward) if b), default=-1)  # gradients are reduced after this one
        for i, examples in enumerate(micro):
            batch = collate_batch(examples)
            tokens += int(batch.input_ids.shape[0] * batch.input_ids.shape[2])
            if keep_adapter[i]:  # one zero frame per row, injected nowhere (audio length 0)
                rows = batch.input_ids.shape[0]
                batch.audio_features = torch.zeros(rows, 1, self.model.config.whisper_adapter_dim)
                batch.audio_lengths = [0] * rows
            if not backward[i]:  # the loss is still reported
                with torch.no_grad(), self._autocast():
                    value, parts = batch_loss(self.ddp_model, batch, return_parts=True)
                self._reshard()
            else:
                # FSDP reduce-scatters every micro-batch: its no_sync would keep a full-size unsharded
                # gradient per parameter on every rank.
                sync = not self.dist.enabled or self.fsdp or i == last
                with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
                    with self._autocast():
                        value, parts = batch_loss(self.ddp_model, batch, return_parts=True)
                    (value / accum).backward()
            total += float(value.detach()) / accum
            for k, v in parts.items():
                parts_sum[k] += float(v.detach()) / accum
        if self.recipe.clip_grad:  # under FSDP the sharded parameters: the root is resharded by now
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.recipe.clip_grad)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.dist.enabled:  # report the global mean loss and token count
            values = torch.tensor([total, *parts_sum.values(), float(tokens)], dtype=torch.float64)
            values = self._sum_over_ranks(values)
            total = float(values[0]) / self.dist.world_size
            parts_sum = {k: float(v) / self.dist.world_size for k, v in zip(STREAMS, values[1:-1].tolist())}
            tokens = int(values[-1])
        epoch, index = self.plan.position(self.step)
        self.step += 1
        elapsed = time.perf_counter() - began
        return StepRecord(self.step, total, parts_sum, lr, tokens, tokens / max(elapsed, 1e-9), epoch, index)

    def fit(self, stop_at: int | None = None) -> list[StepRecord]:
        """Train to ``recipe.steps`` (or stop after step ``stop_at``, e.g. to simulate a kill)."""
        recipe = self.recipe
        existing = self.checkpoint_dirs()
        if existing and self.resume is False:
            raise MiniOmniError(f"{self.output_dir} already holds checkpoints; resume or choose another output_dir")
        if existing:
            self.load_checkpoint(existing[-1])
        else:
            random.seed(recipe.seed)
            np.random.seed(recipe.seed % 2**32)
            torch.manual_seed(recipe.seed)
        main = self.dist.main
        writer = None
        log_path = self.output_dir / "log.jsonl"
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.yaml").write_text(recipe.to_yaml())
            (self.output_dir / "trainable.txt").write_text("\n".join(self.trainable) + "\n")
            _truncate_log(log_path, self.step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.step or None)
            except ImportError:  # pragma: no cover - tensorboard is optional
                log.warning("tensorboard is not installed; no TensorBoard logs")
        bar = None
        if main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=recipe.steps, initial=self.step, desc="train", dynamic_ncols=True)
        end = recipe.steps if stop_at is None else min(stop_at, recipe.steps)
        eval_every = recipe.eval_every or recipe.checkpoint_every
        try:
            while self.step < end:
                record = self.train_step()
                if self.step % eval_every == 0 or self.step == recipe.steps:
                    result = self.evaluate()
                    if result is not None:
                        record.val_loss, record.val_parts = result
                self.history.append(record)
                if main:
                    if (record.step % recipe.log_every == 0 or record.step == recipe.steps
                            or record.val_loss is not None):
                        with log_path.open("a", encoding="utf-8") as handle:
                            handle.write(json.dumps(record.as_json()) + "\n")
                    if writer is not None:
                        writer.add_scalar("loss/total", record.loss, record.step)
                        for k, v in record.parts.items():
                            writer.add_scalar(f"loss/{k}", v, record.step)
                        writer.add_scalar("lr", record.lr, record.step)
                        writer.add_scalar("tokens_per_s", record.tokens_per_s, record.step)
                        if record.val_loss is not None:
                            writer.add_scalar("val/loss", record.val_loss, record.step)
                            for k, v in (record.val_parts or {}).items():
                                writer.add_scalar(f"val/loss_{k}", v, record.step)
                    if bar is not None:
                        bar.update(1)
                        postfix = {"loss": f"{record.loss:.4f}", "lr": f"{record.lr:.2e}"}
                        if record.val_loss is not None:
                            postfix["val"] = f"{record.val_loss:.4f}"
                        bar.set_postfix(postfix)
                if self.step % recipe.checkpoint_every == 0 or self.step == recipe.steps:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(record)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        if self.step >= recipe.steps:
            state = self.full_model_state() if recipe.export else None  # collective under FSDP
            if main:
                plot_losses(log_path, self.output_dir / "loss.png")
                if state is not None:
                    self.export(self.output_dir / "export", state)
                    self.write_bundle(self.output_dir / "model.safetensors", state)
        self._barrier()
        return self.history

    # ------------------------------------------------------------------ export

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model state dict on the CPU, on rank 0 (other ranks get {}); under FSDP every rank must call it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if not self.fsdp:  # every rank holds the whole model; only rank 0 writes
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.dist.main else {}
        state = get_model_state_dict(self.model, options=_state_options(cpu_offload=True))
        if self.parts.config.tie_word_embeddings and "llm.lm_head.weight" in state:
            state["llm.lm_head.weight"] = state["llm.embed.weight"]  # gathered twice; stored once
        return state

    def model_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Float32 weights for export (the tied head dropped); ``state`` from :meth:`full_model_state`."""
        state = self.full_model_state() if state is None else state
        state = {k: v.detach().cpu().float() for k, v in state.items()}
        if self.parts.config.tie_word_embeddings:
            state.pop("llm.lm_head.weight", None)
        return state

    def export(self, directory: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """The published layout (``miniomni generate --checkpoint DIR`` loads it), written atomically.

        Without ``state`` it gathers :meth:`full_model_state` itself, which under FSDP every rank must
        call; distributed callers gather on all ranks and pass ``state`` on rank 0.
        """
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "snac").mkdir(parents=True)
        config = self.parts.config
        config.to_yaml(tmp / "model_config.yaml")
        torch.save(state_dict_to_litgpt(self.model_state(state), config), tmp / "lit_model.pth")
        (tmp / "tokenizer.json").write_text(self.parts.tokenizer_json, encoding="utf-8")
        source = Path(self.recipe.model)
        if source.is_dir() and (source / "small.pt").is_file():
            shutil.copy2(source / "small.pt", tmp / "small.pt")
        else:
            whisper = {"encoder." + k: v for k, v in self.parts.whisper_state.items()}
            torch.save({"dims": dict(self.parts.whisper_dims.__dict__), "model_state_dict": whisper}, tmp / "small.pt")
        if source.is_dir() and (source / "snac").is_dir():
            for name in ("config.json", "pytorch_model.bin"):
                shutil.copy2(source / "snac" / name, tmp / "snac" / name)
        else:
            (tmp / "snac" / "config.json").write_text(json.dumps(self.parts.snac_config))
            torch.save(self.parts.snac_state, tmp / "snac" / "pytorch_model.bin")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        return directory

    def write_bundle(self, path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        p = self.parts
        parts = CheckpointParts(p.config, self.model_state(state), p.whisper_dims, p.whisper_state, p.snac_config,
                                p.snac_state, p.tokenizer_json)
        return write_bundle(parts, path)


def _numpy_rng_to_plain(state: tuple) -> tuple:
    """NumPy's RNG state with its key array as a tensor, so the checkpoint loads with weights_only=True."""
    name, keys, position, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)


def _numpy_rng_from_plain(state: tuple) -> tuple:
    name, keys, position, has_gauss, cached = state
    return name, np.asarray(keys.numpy(), dtype=np.uint32), position, has_gauss, cached


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint's step (they are trained again)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def plot_losses(log_path: Path, png: Path) -> Path | None:
    """The loss curve (total and per stream) from the JSONL log, with the Agg backend."""
    if not log_path.is_file():
        return None
    rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="total", linewidth=2)
    for k in STREAMS:
        values = [r.get(f"loss_{k}", 0.0) for r in rows]
        if any(values):
            ax.plot(steps, values, label=k, linewidth=0.8)
    validated = [r for r in rows if "val_loss" in r]
    if validated:
        ax.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], "o--", label="validation",
                color="black", linewidth=1.2, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log" if all(r["loss"] > 0 and r.get("val_loss", 1) > 0 for r in rows) else "linear")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def train(recipe: Recipe, resume: bool | None = None, progress: bool = True) -> Trainer:
    """Build a :class:`Trainer` and run it to the end."""
    trainer = Trainer(recipe, resume=resume, progress=progress)
    trainer.fit()
    return trainer
