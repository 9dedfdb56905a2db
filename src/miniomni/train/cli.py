"""``miniomni train --recipe R.yaml [key=value ...]``: the training command.

``miniomni.cli`` registers it with :func:`add_train_command`.
For several processes run this module under torchrun::

    torchrun --nproc_per_node 8 -m miniomni.train.cli --recipe recipes/stage3_multimodal.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import MiniOmniError


def add_train_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a recipe (the paper's three stages, or your own)",
        description="Train from a YAML recipe (see recipes/ and docs/training.md). Extra key=value "
                    "arguments override recipe entries, e.g. optim.lr=1e-3 data.batch_tokens=4096. "
                    "A run resumes from the newest checkpoint in its output_dir.",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run_train)
    return parser


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", dest="resume", action="store_true", default=None,
                       help="resume from output_dir's newest checkpoint (the default when there is one)")
    group.add_argument("--no-resume", dest="resume", action="store_false",
                       help="refuse to start when output_dir already holds checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")


def run_train(args: argparse.Namespace) -> int:
    from .recipe import Recipe
    from .trainer import Trainer

    try:
        recipe = Recipe.from_yaml(args.recipe, list(args.overrides or []))
        if getattr(args, "print_recipe", False):
            print(recipe.to_yaml(), end="")
            return 0
        trainer = Trainer(recipe, resume=getattr(args, "resume", None),
                          progress=not getattr(args, "no_progress", False))
        if trainer.dist.main:
            print(f"training {trainer.trainable_count:,} parameters in {len(trainer.trainable)} tensors "
                  f"(patterns {', '.join(recipe.train)}); {len(trainer.frozen)} tensors frozen", file=sys.stderr)
        history = trainer.fit()
        if trainer.dist.main and history:
            last = history[-1]
            print(f"step {last.step}: loss {last.loss:.4f}; output in {recipe.output_dir}", file=sys.stderr)
    except MiniOmniError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="miniomni-train")
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
