"""The trainer: freezing per stage, exact resume, DDP = one process, a toy spoken QA run, export."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from miniomni.errors import ConfigError
from miniomni.train.checkpointing import STATE_FILE
from miniomni.train.recipe import Recipe, select_trainable
from miniomni.train.trainer import Trainer

pytestmark = pytest.mark.slow  # training runs, and processes under torchrun

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

QA = [
    ("What is your name?", "My name is Omni."),
    ("How are you feeling today?", "I feel great."),
    ("How is the weather?", "Sunny and warm."),
    ("Shall we walk?", "Let us go for a walk in the park."),
]


@pytest.fixture(scope="module")
def qa_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA))
    return path


def _wav_bytes(audio: np.ndarray) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def voice_parquet(tmp_path_factory, checkpoint_dir) -> tuple[Path, list[dict]]:
    """Two VoiceAssistant-400K-style rows: questions spoken by espeak-ng, answers encoded by the tiny SNAC.

    Each answer is a sine.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soxr

    from miniomni import load
    from miniomni.data.tts import EspeakBackend
    from miniomni.tokens import layers_to_answer_snac

    omni = load(checkpoint_dir, device="cpu")
    espeak = EspeakBackend()

    def spoken(text: str) -> np.ndarray:
        audio, rate = espeak.synthesize(text, "en-us:230")
        return soxr.resample(audio, rate, 16000).astype(np.float32)

    rows = []
    for index, (answer, freq) in enumerate([("My name is Omni.", 440.0), ("I feel great.", 660.0)]):
        t = np.arange(int(0.25 * 24000)) / 24000
        layers = omni.codec.encode((0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32))
        rows.append({"split_name": "toy", "index": index, "round": 0, "question": QA[index][0],
                         "question_audio": {"bytes": _wav_bytes(spoken(QA[index][0])), "path": None},
                         "answer": answer, "answer_snac": layers_to_answer_snac(layers)})
    path = tmp_path_factory.mktemp("voice") / "voice.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, rows


def _recipe(checkpoint_dir, out, sources, **extra) -> Recipe:
    data = {"sources": sources, "batch_tokens": extra.pop("batch_tokens", 60),
            "max_batch_size": extra.pop("max_batch_size", 1), "grad_accum": extra.pop("grad_accum", 1)}
    base = {"model": str(checkpoint_dir), "output_dir": str(out), "train": ["llm.*"], "steps": 4,
            "checkpoint_every": 100, "data": data, "optim": {"lr": 1e-3, "weight_decay": 0.01},
            "schedule": {"warmup_steps": 1, "min_lr": 1e-5}, "device": "cpu", "export": False, "seed": 7}
    base.update(extra)
    return Recipe.from_dict(base)


def _initial_state(checkpoint_dir) -> dict[str, torch.Tensor]:
    from miniomni.checkpoints import read_checkpoint

    return read_checkpoint(checkpoint_dir).model_state


# ----------------------------------------------------------------------------- recipes


def test_stage_recipes_parse_and_overrides_apply():
    stage1 = Recipe.from_yaml(RECIPES / "stage1_alignment.yaml", ["optim.lr=1e-3", "data.batch_tokens=4096",
                                                                   "data.sources.0.path=elsewhere", "bf16=false"])
    assert stage1.train == ["adapter.*"] and stage1.optim.lr == 1e-3 and stage1.data.batch_tokens == 4096
    assert stage1.data.sources[0].path == "elsewhere" and stage1.bf16 is False
    assert stage1.schedule.min_lr == 4e-6 and stage1.optim.lr > stage1.schedule.min_lr
    assert Recipe.from_yaml(RECIPES / "stage2_adaption.yaml").train == ["llm.*"]
    assert Recipe.from_yaml(RECIPES / "stage3_multimodal.yaml").train == ["llm.*", "adapter.*"]
    assert Recipe.from_yaml(RECIPES / "toy_cpu.yaml").device == "cpu"
    with pytest.raises(ConfigError, match="unknown keys"):
        Recipe.from_yaml(RECIPES / "toy_cpu.yaml", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="not key=value"):
        Recipe.from_yaml(RECIPES / "toy_cpu.yaml", ["steps"])
    assert Recipe.from_yaml(RECIPES / "stage3_multimodal.yaml", ["distributed=fsdp"]).distributed == "fsdp"
    with pytest.raises(ConfigError, match="distributed must be one of ddp, fsdp"):
        Recipe.from_yaml(RECIPES / "toy_cpu.yaml", ["distributed=zero3"])


@pytest.mark.parametrize("pattern", ["*", "whisper.*", "encoder.*", "*.conv1.weight"])
def test_recipe_refuses_training_whisper(pattern):
    with pytest.raises(ConfigError, match="Whisper"):
        Recipe.from_yaml(RECIPES / "toy_cpu.yaml", [f"train=['{pattern}']"])


def test_patterns_matching_nothing_are_refused():
    names = ["adapter.gate.weight", "llm.embed.weight"]
    assert select_trainable(names, ["llm.*"]) == ["llm.embed.weight"]
    with pytest.raises(ConfigError, match="matches no model parameter"):
        select_trainable(names, ["llm.*", "adaptor.*"])


# ----------------------------------------------------------------------------- freezing per stage


@pytest.mark.parametrize("stage", ["stage1_alignment", "stage2_adaption", "stage3_multimodal"])
def test_stage_trains_only_its_parameters(stage, checkpoint_dir, voice_parquet, qa_jsonl, tmp_path):
    patterns = Recipe.from_yaml(RECIPES / f"{stage}.yaml").train
    sources = [{"kind": "voiceassistant", "path": str(voice_parquet[0]), "task": "A1A2"},
               {"kind": "jsonl", "path": str(qa_jsonl), "limit": 2}]
    recipe = _recipe(checkpoint_dir, tmp_path / stage, sources, train=patterns, steps=1, batch_tokens=10_000,
                     max_batch_size=None)
    trainer = Trainer(recipe, progress=False)
    expected = {n for n, _ in trainer.model.named_parameters() if any(n.startswith(p[:-1]) for p in patterns)}
    assert set(trainer.trainable) == expected and trainer.trainable_count > 0
    before = _initial_state(checkpoint_dir)
    trainer.fit()
    after = trainer.model.state_dict()
    for name in before:
        if name in trainer.trainable:
            assert not torch.equal(before[name], after[name]), f"{name} should have trained"
        else:
            assert torch.equal(before[name], after[name]), f"{name} should be frozen"
    # Only audio-input micro-batches reach the adapter: an adapter-only stage gives text rows no backward.
    for batch in trainer.plan.batches:
        speech = any(e.audio_features is not None for e in batch)
        assert trainer._backward_plan([batch]) == ([speech or stage != "stage1_alignment"], [False])
    # The Whisper encoder is never trained.
    assert not any(p.requires_grad for p in trainer.omni.encoder.parameters())
    assert (tmp_path / stage / "trainable.txt").read_text().split() == trainer.trainable


def test_cached_features_are_read_per_batch(checkpoint_dir, voice_parquet, tmp_path):
    """With data.feature_cache the examples hold file references, and a second run (all hits) trains the same."""
    from miniomni.train import CachedFeatures

    sources = [{"kind": "voiceassistant", "path": str(voice_parquet[0]), "task": "A1A2"}]
    runs = []
    for name in ("first", "second"):
        recipe = _recipe(checkpoint_dir, tmp_path / name, sources, steps=2, batch_tokens=10_000,
                         train=["llm.*", "adapter.*"])
        recipe.data.feature_cache = str(tmp_path / "features")
        trainer = Trainer(recipe, progress=False)
        held = [e.audio_features for batch in trainer.plan.batches for e in batch]
        assert len(held) == 2 and all(isinstance(f, CachedFeatures) for f in held)
        runs.append([r.loss for r in trainer.fit()])
    assert len(list((tmp_path / "features").glob("*.npy"))) == 2
    assert runs[0] == runs[1]


def test_validation_loss_on_held_out_examples(checkpoint_dir, qa_jsonl, tmp_path):
    from miniomni.train.collate import collate_batch
    from miniomni.train.loss import loss

    extra = tmp_path / "val.jsonl"
    extra.write_text(json.dumps({"question": "Where is the station?", "answer": "Two streets down."}) + "\n")
    recipe = _recipe(checkpoint_dir, tmp_path / "val", [{"kind": "jsonl", "path": str(qa_jsonl)}], steps=4,
                     eval_every=2)
    recipe.data.validation_split = 0.25
    recipe.data.validation = Recipe.from_dict({**recipe.to_dict(), "data": {
        "sources": [{"kind": "jsonl", "path": str(extra)}]}}).data.sources
    trainer = Trainer(recipe, progress=False)
    held = [e for batch in trainer.val_batches for e in batch]
    trained = [e for batch in trainer.plan.batches for e in batch]
    assert len(held) == 2 and len(trained) == 3  # one of the 4 held out, plus the validation source
    assert not any(h is t for h in held for t in trained)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "val" / "log.jsonl").read_text().splitlines()]
    assert ["val_loss" in row for row in rows] == [False, True, False, True]
    assert {"val_loss_text", "val_loss_audio0"} <= set(rows[1])
    with torch.no_grad():
        direct = [float(loss(trainer.model, collate_batch(batch))) for batch in trainer.val_batches]
    assert rows[3]["val_loss"] == pytest.approx(sum(direct) / len(direct), rel=1e-6)
    assert (tmp_path / "val" / "loss.png").is_file()
    with pytest.raises(ConfigError, match="validation_split"):
        Recipe.from_yaml(RECIPES / "toy_cpu.yaml", ["data.validation_split=1.5"])


# ----------------------------------------------------------------------------- resume


class Killed(RuntimeError):
    pass


def test_kill_and_resume_reproduces_the_uninterrupted_run(checkpoint_dir, qa_jsonl, tmp_path):
    sources = [{"kind": "jsonl", "path": str(qa_jsonl)}]
    steps = 6  # 4 micro-batches per epoch: the run crosses into a second, reshuffled epoch
    # The adapter trains but text rows never reach it: it has no AdamW state in the checkpoint.
    recipe_args = dict(steps=steps, checkpoint_every=3, train=["llm.*", "adapter.*"])
    full = Trainer(_recipe(checkpoint_dir, tmp_path / "full", sources, **recipe_args), progress=False)
    uninterrupted = [r.loss for r in full.fit()]

    def kill(record):
        if record.step == 4:  # after the checkpoint at step 3 and one more step: that one is lost
            raise Killed

    out = tmp_path / "killed"
    first = Trainer(_recipe(checkpoint_dir, out, sources, **recipe_args), on_step=kill, progress=False)
    with pytest.raises(Killed):
        first.fit()
    assert [r.loss for r in first.history] == uninterrupted[:4]
    state = torch.load(out / "checkpoints" / "step-00000003" / STATE_FILE, weights_only=False)
    assert (state["step"], state["epoch"], state["batch_index"]) == (3, 0, 3)
    assert {"python", "numpy", "torch"} <= set(state["rng"]) and "optimizer" in state and "scheduler" in state

    resumed = Trainer(_recipe(checkpoint_dir, out, sources, **recipe_args), progress=False)
    later = resumed.fit()
    adapter = [p for n, p in resumed.model.named_parameters() if n.startswith("adapter.")]
    assert adapter and not any(p in resumed.optimizer.state for p in adapter)
    assert [r.step for r in later] == [4, 5, 6]
    assert [r.loss for r in later] == uninterrupted[3:]
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == list(range(1, steps + 1))
    assert {"loss", "loss_text", "loss_audio0", "lr", "tokens_per_s"} <= set(logged[0])
    with pytest.raises(Exception, match="already holds checkpoints"):
        Trainer(_recipe(checkpoint_dir, out, sources, steps=steps), resume=False, progress=False).fit()
    with pytest.raises(Exception, match="resume with the `train` patterns it was written with"):
        Trainer(_recipe(checkpoint_dir, out, sources, steps=steps + 1), progress=False).fit()  # trains llm.* only


def test_activation_checkpointing_and_bf16(checkpoint_dir, qa_jsonl, tmp_path):
    sources = [{"kind": "jsonl", "path": str(qa_jsonl)}]
    plain = Trainer(_recipe(checkpoint_dir, tmp_path / "a", sources, steps=2), progress=False).fit()
    checkpointed = Trainer(_recipe(checkpoint_dir, tmp_path / "b", sources, steps=2, activation_checkpointing=True),
                           progress=False).fit()
    assert [r.loss for r in checkpointed] == pytest.approx([r.loss for r in plain], rel=1e-6)
    bf16 = Trainer(_recipe(checkpoint_dir, tmp_path / "c", sources, steps=2, bf16=True), progress=False).fit()
    assert all(np.isfinite(r.loss) for r in bf16)
    assert bf16[0].loss == pytest.approx(plain[0].loss, rel=0.05)


# ----------------------------------------------------------------------------- DDP


def test_two_ddp_processes_match_one_process(checkpoint_dir, qa_jsonl, voice_parquet, tmp_path):
    sources = [{"kind": "jsonl", "path": str(qa_jsonl)},
               {"kind": "voiceassistant", "path": str(voice_parquet[0]), "task": "A1A2"}]
    recipe_path = tmp_path / "ddp.yaml"
    recipe = _recipe(checkpoint_dir, tmp_path / "unused", sources, steps=2)
    recipe.data.feature_cache = str(tmp_path / "features")  # the two ranks fill it together, one entry each
    recipe_path.write_text(recipe.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "miniomni.train.cli", "--recipe", str(recipe_path), "--no-progress",
               f"output_dir={tmp_path / 'ddp'}", "data.grad_accum=1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.suffix for p in (tmp_path / "features").iterdir()) == [".npy", ".npy"]  # no temporary files
    single_recipe = _recipe(checkpoint_dir, tmp_path / "one", sources, steps=2, grad_accum=2)
    single_recipe.data.feature_cache = recipe.data.feature_cache
    single = Trainer(single_recipe, progress=False)
    history = single.fit()
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in ddp_log] == pytest.approx([r.loss for r in history], rel=1e-5)
    ddp_state = torch.load(tmp_path / "ddp" / "checkpoints" / "step-00000002" / STATE_FILE, weights_only=False)
    assert ddp_state["world_size"] == 2
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(ddp_state["model"][name], tensor, rtol=0, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- FSDP

FSDP_DRIVER = """
import sys
from miniomni.train.recipe import Recipe
from miniomni.train.trainer import Trainer

recipe = Recipe.from_yaml(sys.argv[1], sys.argv[3:])
trainer = Trainer(recipe, progress=False)
trainer.fit(stop_at=int(sys.argv[2]) or None)
local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in trainer.model.parameters())
with open(f"{recipe.output_dir}/parameters-{trainer.dist.rank}.txt", "w") as handle:
    handle.write(f"{local} {trainer.trainable_count}")
"""


def _torchrun(tmp_path, recipe_path, stop_at, *overrides) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(FSDP_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(driver), str(recipe_path), str(stop_at), *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_fsdp_matches_one_process_and_resumes_exactly(checkpoint_dir, qa_jsonl, tmp_path):
    """2 FSDP ranks = 1 process with the same global batch; killed and resumed FSDP = uninterrupted FSDP;
    an FSDP checkpoint resumes on one process."""
    import shutil

    from miniomni.checkpoints import read_bundle

    sources = [{"kind": "jsonl", "path": str(qa_jsonl)}]
    extra = tmp_path / "val.jsonl"  # one validation batch for two ranks: rank 1 runs a stand-in forward
    extra.write_text(json.dumps({"question": "Where is the station?", "answer": "Two streets down."}) + "\n")
    validation = [{"kind": "jsonl", "path": str(extra)}]
    recipe = _recipe(checkpoint_dir, tmp_path / "unused", sources, steps=4, checkpoint_every=2, export=True,
                     distributed="fsdp", activation_checkpointing=True)
    recipe.data.validation = _recipe(checkpoint_dir, tmp_path, validation).data.sources
    recipe_path = tmp_path / "fsdp.yaml"
    recipe_path.write_text(recipe.to_yaml())
    _torchrun(tmp_path, recipe_path, 0, f"output_dir={tmp_path / 'full'}")
    counts = [(tmp_path / "full" / f"parameters-{rank}.txt").read_text().split() for rank in (0, 1)]
    # each rank holds half of every parameter (plus dim-0 padding and the small frozen adapter), not a copy
    assert all(int(local) < 0.55 * int(total) for local, total in counts), counts
    _torchrun(tmp_path, recipe_path, 3, f"output_dir={tmp_path / 'killed'}")  # step 3 is lost: checkpoint at 2
    assert len(_losses(tmp_path / "killed")) == 3
    shutil.copytree(tmp_path / "killed", tmp_path / "to_one")
    _torchrun(tmp_path, recipe_path, 0, f"output_dir={tmp_path / 'killed'}")
    fsdp = _losses(tmp_path / "full")
    assert _losses(tmp_path / "killed") == fsdp

    single_recipe = _recipe(checkpoint_dir, tmp_path / "one", sources, steps=4, checkpoint_every=2, grad_accum=2,
                            export=True)
    single_recipe.data.validation = recipe.data.validation
    single = Trainer(single_recipe, progress=False)
    # One thread, as each rank has: with two, a product over few rows may split its sum between the
    # threads, and Adam turns that rounding in near-zero gradients into whole steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = single.fit()
    finally:
        torch.set_num_threads(threads)
    assert fsdp == pytest.approx([r.loss for r in history], rel=1e-5)
    lines = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    validated = [json.loads(line).get("val_loss") for line in lines]
    assert validated[0] is None and validated[2] is None
    assert validated[1::2] == pytest.approx([history[1].val_loss, history[3].val_loss], rel=1e-5)
    state = torch.load(tmp_path / "full" / "checkpoints" / "step-00000004" / STATE_FILE, weights_only=True)
    assert state["world_size"] == 2 and isinstance(next(iter(state["optimizer"]["state"])), str)
    exported = read_bundle(tmp_path / "full" / "model.safetensors").model_state
    config = single.parts.config
    # The key bias has a zero gradient in exact arithmetic (softmax ignores a constant per query), so
    # AdamW turns rounding noise into steps there that differ between runs; compare q and v only.
    rows = config.n_query_groups * config.head_size * 2 + config.n_head * config.head_size
    keys = torch.zeros(rows, dtype=torch.bool)
    keys[config.n_head * config.head_size : (config.n_head + config.n_query_groups) * config.head_size] = True
    for name, tensor in single.model.state_dict().items():
        rows = ~keys if name.endswith("qkv.bias") else slice(None)
        torch.testing.assert_close(state["model"][name][rows], tensor[rows], rtol=0, atol=1e-5, msg=name)
        if name in exported:
            torch.testing.assert_close(exported[name][rows], tensor[rows], rtol=0, atol=1e-5, msg=name)

    one = Trainer(_recipe(checkpoint_dir, tmp_path / "to_one", sources, steps=4, checkpoint_every=2, grad_accum=2,
                          distributed="fsdp"), progress=False)
    assert [r.loss for r in one.fit()] == pytest.approx(fsdp[2:], rel=1e-5)


@pytest.mark.parametrize("train", [["adapter.*"], ["llm.*", "adapter.*"]], ids=["stage1", "stage3"])
def test_fsdp_on_mixed_speech_and_text_matches_one_process(train, checkpoint_dir, qa_jsonl, voice_parquet, tmp_path):
    """Speech and text rows, 2 FSDP ranks x 2 accumulation steps against one process: positions where only
    one rank has speech (its partner keeps the adapter in its graph), positions where no rank has speech
    (adapter-only: no backward anywhere), and a step whose last micro-batches have no backward."""
    from miniomni.train.dataplan import DataPlan

    speech = {"kind": "voiceassistant", "path": str(voice_parquet[0]), "task": "A1A2"}
    sources = [speech, speech, {"kind": "jsonl", "path": str(qa_jsonl)}]  # 4 speech + 4 text micro-batches
    probe = Trainer(_recipe(checkpoint_dir, tmp_path / "probe", sources, train=train, steps=4), progress=False)
    is_speech = {id(batch): batch[0].audio_features is not None for batch in probe.plan.batches}

    def patterns(seed: int) -> set[str]:
        plan = DataPlan(probe.plan.batches, seed, 2, 2, True)
        found = set()
        for step in range(4):
            ranks = [[is_speech[id(b)] for b in plan.micro_batches(step, r)] for r in (0, 1)]
            for position in (0, 1):
                pair = {ranks[0][position], ranks[1][position]}
                found.add("mixed" if len(pair) == 2 else ("none" if pair == {False} else "both"))
            if ranks[0] == ranks[1] == [True, False] and step < 3:  # and a later step reads the update
                found.add("backward then none")
        return found

    seed = next(s for s in range(500) if patterns(s) >= {"mixed", "none", "backward then none"})
    recipe = _recipe(checkpoint_dir, tmp_path / "unused", sources, train=train, steps=4, seed=seed,
                     distributed="fsdp", optim={"lr": 1e-2, "weight_decay": 0.0}, clip_grad=0.5)
    recipe_path = tmp_path / "fsdp.yaml"
    recipe_path.write_text(recipe.to_yaml())
    _torchrun(tmp_path, recipe_path, 0, f"output_dir={tmp_path / 'fsdp'}", "data.grad_accum=2")
    single = Trainer(_recipe(checkpoint_dir, tmp_path / "one", sources, train=train, steps=4, seed=seed,
                             grad_accum=4, optim={"lr": 1e-2, "weight_decay": 0.0}, clip_grad=0.5), progress=False)
    history = single.fit()
    assert _losses(tmp_path / "fsdp") == pytest.approx([r.loss for r in history], rel=1e-5)
    state = torch.load(tmp_path / "fsdp" / "checkpoints" / "step-00000004" / STATE_FILE, weights_only=True)
    before = _initial_state(checkpoint_dir)
    for name, tensor in single.model.state_dict().items():
        if name.startswith("adapter."):
            assert not torch.equal(tensor, before[name])
            # Adam divides by each gradient's running RMS: where a gradient is near zero, a last-bit
            # difference in the summed gradients (FSDP sums in another order than one process, and
            # CPUs order sums differently) moves that element's update by a visible fraction of lr.
            # Elsewhere the two agree to 1e-5; a wrong gradient would move elements by ~lr (1e-2).
            difference = (state["model"][name] - tensor).abs()
            assert float((difference > 1e-5).float().mean()) < 0.01, (name, float(difference.max()))
            assert float(difference.max()) < 1e-3, (name, float(difference.max()))


# ----------------------------------------------------------------------------- toy spoken QA + export


def test_toy_spoken_qa_run_exports_a_model_that_answers(checkpoint_dir, voice_parquet, tmp_path):
    """Train the tiny random model on two spoken questions with spoken answers, then answer them greedily."""
    from miniomni import load
    from miniomni.checkpoints import read_bundle
    from miniomni.tokens import answer_snac_to_layers, delay

    path, rows = voice_parquet
    out = tmp_path / "spoken"
    recipe = _recipe(checkpoint_dir, out, [{"kind": "voiceassistant", "path": str(path), "task": "A1A2"}],
                     train=["llm.*", "adapter.*"], steps=50, batch_tokens=10_000, max_batch_size=None,
                     optim={"lr": 1e-2, "weight_decay": 0.0}, schedule={"warmup_steps": 5, "min_lr": 1e-4},
                     export=True)
    recipe.data.mask_audio_padding = False  # from scratch: also learn the delay pads and the pads after _eoa
    history = Trainer(recipe, progress=False).fit()
    assert history[-1].loss < 0.02 * history[0].loss
    for name in ("log.jsonl", "loss.png", "model.safetensors", "export/lit_model.pth", "export/small.pt",
                 "export/snac/config.json", "export/tokenizer.json", "export/model_config.yaml"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    model = load(out / "export", device="cpu")
    for row in rows:
        result = model.generate("A1A2", audio=row["question_audio"]["bytes"], max_new_tokens=60)
        assert result.text == row["answer"]
        expected = delay(answer_snac_to_layers(row["answer_snac"]))  # codes and _eoa per layer, delayed
        assert torch.equal(torch.tensor(result.audio_tokens), expected[:, : len(result.audio_tokens[0])])
        assert result.audio_tokens[6][-1] == expected[6, -1]  # stopped on layer 6's _eoa
    bundle = read_bundle(out / "model.safetensors")
    exported = load(out / "export", device="cpu").model.state_dict()
    for name, tensor in bundle.model_state.items():
        assert torch.equal(tensor, exported[name]), name
    assert load(out / "model.safetensors", device="cpu") is not None


def test_cli_registers_train_and_prints_the_recipe(capsys):
    import argparse

    from miniomni.train.cli import add_train_command

    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--recipe", str(RECIPES / "toy_cpu.yaml"), "--print-recipe", "steps=7"])
    assert args.func(args) == 0
    assert "steps: 7" in capsys.readouterr().out
    args = parser.parse_args(["train", "--recipe", str(RECIPES / "toy_cpu.yaml"), "train=['*']"])
    assert args.func(args) == 2


def test_micro_batch_that_touches_no_trained_weight_is_skipped(checkpoint_dir, qa_jsonl, tmp_path):
    """Stage 1 trains only the adapter; a text-only micro-batch gives it no gradient and must not crash."""
    recipe = _recipe(checkpoint_dir, tmp_path / "s1", [{"kind": "jsonl", "path": str(qa_jsonl), "limit": 2}],
                     train=["adapter.*"], steps=2)
    trainer = Trainer(recipe, progress=False)
    before = _initial_state(checkpoint_dir)
    trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "s1" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(row["loss"]) for row in log)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before if name.startswith("adapter."))
