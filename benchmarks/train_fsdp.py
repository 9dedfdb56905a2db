"""DDP against FSDP: memory per rank and speed of stage 3 (all but Whisper) from SmolLM2-135M-Instruct.

Builds the same checkpoint and spoken data as ``train_smollm2.py`` (reused from its workdir
when present), then runs the stage-3 recipe for a few steps under ``torchrun`` with 2 CPU
ranks, once with ``distributed: ddp`` and once with ``distributed: fsdp``. Each rank reports
the bytes it holds of parameters, gradients and AdamW state, its peak RSS and its tokens/s.

    python benchmarks/train_fsdp.py --steps 6 --workdir /tmp/miniomni-smollm2-train
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(recipe_path: str, overrides: list[str]) -> None:
    """One rank (run by torchrun): train, then write this rank's figures next to the log."""
    from miniomni.train.recipe import Recipe
    from miniomni.train.trainer import Trainer

    recipe = Recipe.from_yaml(recipe_path, overrides)
    trainer = Trainer(recipe, resume=False, progress=False)
    trainer.fit()
    params = list(trainer.model.parameters())
    state = [v for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"]
    figures = {
        "rank": trainer.dist.rank,
        "parameters_mb": _local_bytes(params) / 2**20,
        "gradients_mb": _local_bytes(p.grad for p in params) / 2**20,
        "optimizer_mb": _local_bytes(state) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_s": [r.tokens_per_s for r in trainer.history],
        "losses": [r.loss for r in trainer.history],
    }
    Path(recipe.output_dir, f"figures-{trainer.dist.rank}.json").write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/miniomni-smollm2-train")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from train_smollm2 import STAGES, gguf_path, make_components, make_data

    from miniomni.train.from_lm import init_from_lm
    from miniomni.train.recipe import Recipe

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "smollm2-omni"
    whisper, snac = make_components(workdir)
    if not (checkpoint / "lit_model.pth").is_file():
        init_from_lm(gguf_path(), checkpoint, whisper=whisper, snac=snac)
    data = make_data(workdir, snac)
    base = Recipe.from_yaml(ROOT / "recipes" / "stage3_multimodal.yaml").to_dict()
    rows = []
    for mode in ("ddp", "fsdp"):
        out = workdir / "fsdp-bench" / mode
        recipe = Recipe.from_dict({
            **base, "model": str(checkpoint), "output_dir": str(out), "steps": args.steps, "checkpoint_every": 10_000,
            "device": "cpu", "export": False, "distributed": mode,
            "data": {"sources": STAGES["stage3_multimodal"](data), "batch_tokens": 512, "max_batch_size": 2,
                     "grad_accum": 1, "feature_cache": str(workdir / "features")},
            "schedule": {"warmup_steps": 1, "min_lr": base["optim"]["lr"] / 10}})
        if out.exists():
            import shutil

            shutil.rmtree(out)
        out.mkdir(parents=True)
        recipe_path = out.parent / f"{mode}.yaml"
        recipe_path.write_text(recipe.to_yaml())
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(args.ranks), str(Path(__file__).resolve()), "--worker", str(recipe_path)],
                       env=env, check=True)
        wall = time.perf_counter() - started
        for rank in range(args.ranks):
            figures = json.loads((out / f"figures-{rank}.json").read_text())
            rows.append((mode, wall, figures))
    print(f"\n{args.ranks} CPU ranks, stage 3 from SmolLM2-135M-Instruct, {args.steps} steps, float32")
    print(f"{'mode':5} {'rank':>4} {'params MB':>10} {'grads MB':>9} {'AdamW MB':>9} {'peak RSS MB':>12} "
          f"{'tokens/s (median)':>18} {'wall s':>7}  losses")
    for mode, wall, f in rows:
        speed = float(np.median(f["tokens_per_s"][1:] or f["tokens_per_s"]))
        losses = " ".join(f"{x:.3f}" for x in f["losses"])
        print(f"{mode:5} {f['rank']:>4} {f['parameters_mb']:>10.0f} {f['gradients_mb']:>9.0f} "
              f"{f['optimizer_mb']:>9.0f} "
              f"{f['peak_rss_mb']:>12.0f} {speed:>18.0f} {wall:>7.1f}  {losses}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
    else:
        main()
