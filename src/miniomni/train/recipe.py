"""Training recipes: a YAML file -> a validated :class:`Recipe`, with ``key=value`` dotted overrides.

A recipe names the model to start from, the data, which parameters train (glob patterns over
OmniModel parameter names, e.g. ``adapter.*``), the optimizer, the schedule, the batching and
where to write. See ``recipes/*.yaml`` and docs/training.md.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..audio import ENCODER_CONTEXTS
from ..errors import ConfigError
from ..tokens import Task

READER_KINDS = ("voiceassistant", "librispeech", "jsonl")
DISTRIBUTED_MODES = ("ddp", "fsdp")


@dataclass
class DataSource:
    """One reader: ``kind`` voiceassistant (parquet file/folder), librispeech (folder) or jsonl (file)."""

    kind: str
    path: str
    task: str | None = None  # voiceassistant: A1A2/A1T2/T1A2/T1T2; librispeech is ASR, jsonl T1T2
    limit: int | None = None  # read at most this many records

    def validate(self) -> None:
        if self.kind not in READER_KINDS:
            raise ConfigError(f"data source kind {self.kind!r} is unknown; use one of {', '.join(READER_KINDS)}")
        if self.task is not None:
            Task.parse(self.task)


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    batch_tokens: int = 8192  # padded positions per micro-batch (collate.bucket_by_length)
    max_batch_size: int | None = None
    grad_accum: int = 1  # micro-batches per rank per optimizer step
    shuffle: bool = True  # shuffle the order of the micro-batches every epoch (seeded)
    mask_audio_padding: bool = True
    feature_cache: str | None = None  # a folder for cached Whisper features
    encoder_context: str = "30"  # how much audio Whisper attends over: 30 (generate's), 10 (serve's), 5, audio
    validation: list[DataSource] = field(default_factory=list)  # held-out sources for the validation loss
    validation_split: float = 0.0  # also hold out this seeded fraction of the training examples


@dataclass
class OptimConfig:
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    min_lr: float = 4e-6  # cosine from optim.lr down to this at the last step


@dataclass
class Recipe:
    model: str  # a checkpoint directory (published layout) or a .safetensors bundle
    output_dir: str
    train: list[str]  # glob patterns over OmniModel parameter names
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    steps: int = 1000
    clip_grad: float | None = 1.0
    bf16: bool = False  # torch.autocast(device, bfloat16)
    activation_checkpointing: bool = False
    checkpoint_every: int = 500
    eval_every: int | None = None  # validation loss every N steps and at the end (default: checkpoint_every)
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 1234
    device: str = "auto"
    distributed: str = "ddp"  # under torchrun: ddp (a full copy per rank) or fsdp (sharded over ranks)
    export: bool = True

    # ------------------------------------------------------------------ building

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"recipe has unknown keys: {', '.join(sorted(unknown))}")
        for key in ("model", "output_dir", "train"):
            if key not in data:
                raise ConfigError(f"recipe needs a {key!r} entry")
        data["data"] = _section(DataConfig, data.get("data") or {}, "data")
        data["data"].sources = [s if isinstance(s, DataSource) else _section(DataSource, s, "data.sources[]")
                                for s in data["data"].sources]
        data["data"].validation = [s if isinstance(s, DataSource) else _section(DataSource, s, "data.validation[]")
                                   for s in data["data"].validation or []]
        data["optim"] = _section(OptimConfig, data.get("optim") or {}, "optim")
        data["optim"].betas = tuple(float(b) for b in data["optim"].betas)
        data["schedule"] = _section(ScheduleConfig, data.get("schedule") or {}, "schedule")
        if isinstance(data["train"], str):
            data["train"] = [data["train"]]
        recipe = cls(**_coerce(cls, data))
        recipe.validate()
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} not found")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping")
        data = apply_overrides(data, overrides or [])
        # Relative paths in a recipe are relative to the working directory (as on the command line).
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("recipe 'train' lists no parameter patterns; name what trains, e.g. ['adapter.*']")
        for pattern in self.train:
            if _is_whisper_pattern(pattern):
                raise ConfigError(f"train pattern {pattern!r} would train the Whisper encoder, which is never trained")
        if not self.data.sources:
            raise ConfigError("recipe has no data.sources")
        for source in [*self.data.sources, *self.data.validation]:
            source.validate()
        self.data.encoder_context = str(self.data.encoder_context)
        if self.data.encoder_context not in ENCODER_CONTEXTS:
            raise ConfigError(f"data.encoder_context {self.data.encoder_context!r} is not one of "
                              f"{', '.join(ENCODER_CONTEXTS)}; train with the context you will serve with")
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.data.batch_tokens >= 1, "data.batch_tokens must be >= 1"),
            (self.data.grad_accum >= 1, "data.grad_accum must be >= 1"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (0 <= self.schedule.min_lr <= self.optim.lr, "schedule.min_lr must lie in [0, optim.lr]"),
            (self.schedule.warmup_steps >= 0, "schedule.warmup_steps must be >= 0"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.eval_every is None or self.eval_every >= 1, "eval_every must be >= 1 or null"),
            (0 <= self.data.validation_split < 1, "data.validation_split must lie in [0, 1)"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0 or null"),
            (len(self.optim.betas) == 2, "optim.betas needs two numbers"),
            (self.distributed in DISTRIBUTED_MODES, f"distributed must be one of {', '.join(DISTRIBUTED_MODES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"recipe: {message}")


# Names the Whisper encoder's parameters get in the trainer's namespace; a pattern matching any is refused.
WHISPER_PREFIXES = ("whisper.", "encoder.", "audio_encoder.")


def _is_whisper_pattern(pattern: str) -> bool:
    probes = [p + name for name in ("blocks.0.attn.query.weight", "conv1.weight") for p in WHISPER_PREFIXES]
    return any(fnmatch.fnmatchcase(probe, pattern) for probe in probes)


def select_trainable(names: list[str], patterns: list[str]) -> list[str]:
    """The parameter names matched by any pattern; refuses a pattern that matches nothing."""
    chosen: list[str] = []
    for pattern in patterns:
        if _is_whisper_pattern(pattern):
            raise ConfigError(f"train pattern {pattern!r} would train the Whisper encoder, which is never trained")
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(f"train pattern {pattern!r} matches no model parameter (names look like "
                              f"{', '.join(names[:3])} …)")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in names if n in chosen]


def _section(kind, values: Any, name: str):
    if isinstance(values, kind):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"recipe section {name} must be a mapping")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"recipe section {name} has unknown keys: {', '.join(sorted(unknown))}")
    try:
        return kind(**_coerce(kind, values))
    except TypeError as exc:
        raise ConfigError(f"recipe section {name}: {exc}") from exc


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; read it as the number it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(kind, values: dict[str, Any]) -> dict[str, Any]:
    types = {f.name: str(f.type) for f in dataclasses.fields(kind)}
    out = dict(values)
    for key, value in values.items():
        t = types.get(key, "")
        if isinstance(value, str) and (t.startswith(("float", "int"))):
            number = _number(value)
            whole = t.startswith("int") and isinstance(number, float) and number.is_integer()
            out[key] = int(number) if whole else number
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key=value`` with dotted keys (``optim.lr=1e-3``); values are parsed as YAML (numbers, lists, null)."""
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        value = _number(yaml.safe_load(raw)) if raw else ""
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if part.isdigit() and isinstance(node, list):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not inside a mapping")
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list) and last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return data
