"""The training loop ("Any Model Can Talk"): one process or many under ``torchrun`` (DDP or FSDP).

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
* a validation loss over held-out examples (``data.validation`` sources and/or a seeded
  ``data.validation_split``) every ``eval_every`` steps.

The rest lives beside it: :mod:`.distributed` (process group, DDP / FSDP, sums over ranks),
:mod:`.checkpointing` (exact resume, export), :mod:`.logs` (JSONL, TensorBoard, the loss curve).
``docs/training.md`` describes the whole training layout.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import CheckpointParts, read_checkpoint
from ..data.jsonl import read_jsonl
from ..data.librispeech import read_librispeech
from ..data.voiceassistant import read_voiceassistant
from ..devices import resolve_device
from ..errors import MiniOmniError
from ..models.omni import OmniModel
from ..tokens import Task
from . import checkpointing, distributed
from .collate import TrainingExample, bucket_by_length, collate_batch, collate_record
from .dataplan import DataPlan, split_validation
from .features import FeatureCache
from .logs import LOG_FILE, RunLogs, StepRecord, plot_losses
from .loss import STREAMS
from .loss import loss as batch_loss
from .recipe import Recipe, select_trainable

log = logging.getLogger(__name__)


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
        count = 0
        for count, record in enumerate(records, 1):
            if source.limit is not None and count > source.limit:
                break
            if source.task and source.kind != "voiceassistant":
                record.task = Task.parse(source.task)
            yield record
        if count == 0:
            raise MiniOmniError(f"data source {source.kind} {source.path} holds no records: check the path "
                                "(a parquet file or folder, a LibriSpeech folder, a JSONL file)")


def load_examples(recipe: Recipe, parts: CheckpointParts, encode: Callable | None,
                  sources: list | None = None, dist_info: distributed.DistInfo | None = None) -> list[TrainingExample]:
    """Every record of ``sources`` (the recipe's training sources by default) as a training example.

    Whisper features of audio input come through a :class:`FeatureCache`.

    With several ranks and a feature cache folder, each rank first fills the cache for every W-th
    record, so the Whisper work is split over the ranks rather than repeated on each.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(parts.tokenizer_json)
    sources = recipe.data.sources if sources is None else sources
    features = None
    if encode is not None:
        # With a cache folder the examples hold CachedFeatures: features are read per batch, not kept in memory.
        # Named by the encoder's weights and context: later stages (new checkpoints, same Whisper) reuse the cache.
        namespace = f"whisper:{encoder_fingerprint(encode)}:context={recipe.data.encoder_context}"
        features = FeatureCache(encode, recipe.data.feature_cache, namespace=namespace, lazy=True)
        if dist_info is not None and dist_info.enabled and recipe.data.feature_cache:
            for index, record in enumerate(_source_records(sources)):
                if index % dist_info.world_size == dist_info.rank and Task.parse(record.task).audio_input:
                    features(record.question_audio)
            distributed.barrier(dist_info)
    examples = [collate_record(record, tokenizer, features, recipe.data.mask_audio_padding)
                for record in _source_records(sources)]
    if not examples:
        raise MiniOmniError("the recipe's data sources yielded no examples")
    return examples


def encoder_fingerprint(encode: Callable) -> str:
    """SHA-256 (16 hex digits) of the Whisper encoder's weights behind ``encode`` (a MiniOmni's encode_audio)."""
    import hashlib

    digest = hashlib.sha256()
    encoder = getattr(getattr(encode, "__self__", None), "encoder", None)
    if encoder is None:
        return "unknown"
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- trainer


@dataclass
class Trainer:
    """Build with a :class:`Recipe`; :meth:`fit` trains (resuming from ``output_dir`` if it holds a checkpoint)."""

    recipe: Recipe
    resume: bool | None = None  # None: resume when output_dir has a checkpoint; False: refuse to overwrite one
    on_step: Callable[[StepRecord], None] | None = None  # called after every optimizer step (may raise)
    progress: bool = True
    history: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._join_ranks()
        self._load_model()
        self._select_trainable()
        self._prepare_model()
        self._build_optimizer()
        self._load_data()
        self.step = 0

    def _join_ranks(self) -> None:
        """The device and this process's rank (one GPU per local rank); whether the model is sharded."""
        recipe = self.recipe
        self.device = resolve_device(recipe.device)
        self.dist = distributed.init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.fsdp = recipe.distributed == "fsdp" and self.dist.enabled
        if recipe.distributed == "fsdp" and not self.dist.enabled:
            log.info("distributed: fsdp shards over torchrun ranks; one process trains unsharded")
        self.output_dir = Path(recipe.output_dir)

    def _load_model(self) -> None:
        """The recipe's checkpoint, as float32 weights the model owns."""
        from ..pipeline import MiniOmni
        from ..precision import Precision

        self.parts = read_checkpoint(self.recipe.model)
        # Under FSDP the decoder is built on the CPU; fully_shard moves each rank's shards to the device.
        omni = MiniOmni.from_parts(self.parts, torch.device("cpu") if self.fsdp else self.device,
                                   Precision(dtype=torch.float32), encoder_context=self.recipe.data.encoder_context)
        if self.fsdp and self.device.type != "cpu":
            omni.encoder.to(self.device)
            omni.device = self.device
        self.omni = omni
        self.model = omni.model
        if not self.fsdp:  # own storage (the loaded tensors may be memory-mapped); FSDP copies each shard anyway
            for param in self.model.parameters():
                param.data = param.data.clone()

    def _select_trainable(self) -> None:
        """Freeze everything but the parameters the recipe's patterns select (Whisper always frozen)."""
        model = self.model
        names = [n for n, _ in model.named_parameters()]
        self.trainable = select_trainable(names, self.recipe.train)
        for name, param in model.named_parameters():
            param.requires_grad_(name in self.trainable)
        self.omni.encoder.requires_grad_(False)
        self.frozen = [n for n in names if n not in self.trainable]
        count = sum(p.numel() for n, p in model.named_parameters() if n in self.trainable)
        total = sum(p.numel() for p in model.parameters())
        self.trainable_count = count
        if self.dist.main:
            log.info("training %d of %d parameters (%d tensors): %s", count, total, len(self.trainable),
                     ", ".join(self.trainable))

    def _prepare_model(self) -> None:
        """Activation checkpointing, training mode, then FSDP sharding or a DDP wrapper over the ranks."""
        model = self.model
        if self.recipe.activation_checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        self.ddp_model: Any = model
        if self.fsdp:  # the sharded module is called directly
            distributed.shard_model(model, self.device, self.dist.world_size)
        elif self.dist.enabled:
            self.ddp_model = distributed.wrap_ddp(model, self.device)
        self._release_source_weights()

    def _release_source_weights(self) -> None:
        """The model owns its weights now: drop the loaded ones (and their memory-mapped pages)."""
        from ..safeload import mapped_ranges, release_pages

        ranges = mapped_ranges(self.parts.weights_file) if self.parts.weights_file is not None else []
        if ranges:
            for tensor in self.parts.model_state.values():
                release_pages(tensor, ranges)
        self.parts.model_state = {}

    def _build_optimizer(self) -> None:
        """AdamW (no weight decay on vectors) over the trained parameters, with the warmup + cosine schedule."""
        recipe = self.recipe
        params = [p for n, p in self.model.named_parameters() if n in self.trainable]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        o = recipe.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas, eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(recipe.schedule.warmup_steps, recipe.steps, recipe.schedule.min_lr / o.lr))

    def _load_data(self) -> None:
        """Every training and held-out example, bucketed into micro-batches, and the order steps take them in."""
        recipe = self.recipe
        all_sources = [*recipe.data.sources, *recipe.data.validation]
        needs_audio = any(s.kind == "librispeech" or Task.parse(
            s.task or ("A1A2" if s.kind == "voiceassistant" else "T1T2")).audio_input for s in all_sources)
        encode = self.omni.encode_audio if needs_audio else None
        examples, held_out = split_validation(load_examples(recipe, self.parts, encode, dist_info=self.dist),
                                              recipe.data.validation_split, recipe.seed)
        if recipe.data.validation:
            held_out += load_examples(recipe, self.parts, encode, recipe.data.validation, self.dist)
        self.val_batches = bucket_by_length(held_out, recipe.data.batch_tokens, recipe.data.max_batch_size)
        batches = bucket_by_length(examples, recipe.data.batch_tokens, recipe.data.max_batch_size)
        self.plan = DataPlan(batches, recipe.seed, self.dist.world_size, recipe.data.grad_accum, recipe.data.shuffle)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dirs(self) -> list[Path]:
        """This run's complete checkpoints, oldest first."""
        return checkpointing.checkpoint_dirs(self.output_dir)

    def save_checkpoint(self) -> Path:
        """Rank 0 writes ``checkpoints/step-N`` atomically; every rank waits for it."""
        # Collective under FSDP (every rank takes part; rank 0 receives the full tensors).
        model_state = self.full_model_state()
        optimizer_state = {}
        if self.fsdp or self.dist.main:  # a collective under FSDP; otherwise only rank 0 needs it
            optimizer_state = checkpointing.full_optimizer_state(self.model, self.optimizer)
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
                "rng": checkpointing.rng_state(),
                "world_size": self.dist.world_size,
                "micro_batches_per_step": self.plan.per_step,
                "recipe": self.recipe.to_dict(),
            }
            checkpointing.write_checkpoint(self.output_dir, self.step, state, self.recipe.to_yaml(),
                                           self.recipe.keep_checkpoints)
        distributed.barrier(self.dist)
        return checkpointing.checkpoint_dir(self.output_dir, self.step)

    def load_checkpoint(self, path: Path) -> None:
        """Continue from checkpoint folder ``path`` exactly where it stopped (weights, optimizer, RNGs, data)."""
        state = checkpointing.read_checkpoint_state(path)
        checkpointing.check_resumable(state, path, self.plan, self.trainable, self.dist.world_size)
        checkpointing.load_model_and_optimizer(self.model, self.optimizer, state, path)
        self.scheduler.load_state_dict(state["scheduler"])
        checkpointing.set_rng_state(state["rng"])
        self.step = int(state["step"])
        if self.dist.main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, state["epoch"],
                     state["batch_index"])

    # ------------------------------------------------------------------ loop

    def _backward_plan(self, micro: list[list[TrainingExample]]) -> tuple[list[bool], list[bool]]:
        """(backward, keep_adapter) per micro-batch of this step, agreed between the ranks (:func:`backward_plan`)."""
        audio = [any(e.audio_features is not None for e in examples) for examples in micro]
        return distributed.backward_plan(audio, self.trainable, self.dist, self.device)

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
        sums = distributed.sum_over_ranks(sums, self.dist, self.device)
        count = float(sums[-1])
        return float(sums[0]) / count, {k: float(v) / count for k, v in zip(STREAMS, sums[1:-1].tolist(), strict=True)}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.recipe.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> StepRecord:
        """One optimizer step over this rank's micro-batches; the record holds the mean over all ranks."""
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
            values = distributed.sum_over_ranks(values, self.dist, self.device)
            world = self.dist.world_size
            total = float(values[0]) / world
            parts_sum = {k: float(v) / world for k, v in zip(STREAMS, values[1:-1].tolist(), strict=True)}
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
        logs = None
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.yaml").write_text(recipe.to_yaml())
            (self.output_dir / "trainable.txt").write_text("\n".join(self.trainable) + "\n")
            logs = RunLogs(self.output_dir, self.step, recipe.steps, recipe.log_every, self.progress)
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
                if logs is not None:
                    logs.write(record)
                if self.step % recipe.checkpoint_every == 0 or self.step == recipe.steps:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(record)
        finally:
            if logs is not None:
                logs.close()
        if self.step >= recipe.steps:
            state = self.full_model_state() if recipe.export else None  # collective under FSDP
            if main:
                plot_losses(self.output_dir / LOG_FILE, self.output_dir / "loss.png")
                if state is not None:
                    self.export(self.output_dir / "export", state)
                    self.write_bundle(self.output_dir / "model.safetensors", state)
        distributed.barrier(self.dist)
        return self.history

    # ------------------------------------------------------------------ export

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model state dict on the CPU, on rank 0 (other ranks get {}); under FSDP every rank must call it."""
        return distributed.full_model_state(self.model, self.dist, self.fsdp, self.parts.config.tie_word_embeddings)

    def model_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Float32 weights for export (the tied head dropped); ``state`` from :meth:`full_model_state`."""
        state = self.full_model_state() if state is None else state
        return checkpointing.export_weights(state, self.parts.config.tie_word_embeddings)

    def export(self, directory: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """The published layout (``miniomni generate --checkpoint DIR`` loads it), written atomically.

        Without ``state`` it gathers :meth:`full_model_state` itself, which under FSDP every rank must
        call; distributed callers gather on all ranks and pass ``state`` on rank 0.
        """
        weights = self.model_state(state)
        return checkpointing.export_layout(Path(directory), self.parts, weights, Path(self.recipe.model))

    def write_bundle(self, path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """The same as one ``.safetensors`` bundle."""
        return checkpointing.export_bundle(path, self.parts, self.model_state(state))


def train(recipe: Recipe, resume: bool | None = None, progress: bool = True) -> Trainer:
    """Build a :class:`Trainer` and run it to the end."""
    trainer = Trainer(recipe, resume=resume, progress=progress)
    trainer.fit()
    return trainer
