"""``miniomni data synth --ray``: rows spoken and encoded by an actor pool on Ray Data.

Only the making of rows moves to Ray: each actor loads the TTS backend and the SNAC codec
once (as a local worker process does) and runs :func:`~miniomni.data.synth.make_row` on
blocks of pairs. The results come back to this process in input order
(``preserve_order``), where :func:`~miniomni.data.synth.synthesize` groups them into shards
and writes the parquet files, state files and manifest exactly as in a local run. So the
files are the same, resuming is the same, and the workers need no shared file system:
only this process reads the input and writes the output directory.

``ray`` is imported only inside these functions; the module itself imports without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MiniOmniError, install_hint
from .synth import JobState, SynthOptions, init_worker, make_row, synthesize

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("miniomni.data")

MAX_BLOCK_ROWS = 16  # rows per Ray Data block (one actor call): small enough to spread over the pool


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """``miniomni data synth``'s flags for Ray (they do nothing without ``--ray``)."""
    p.add_argument("--ray", action="store_true",
                   help="make the rows in an actor pool on Ray Data, --workers actors ("
                        f"{install_hint('ray')}; see docs/data.md); the files are those of a local run")
    p.add_argument("--ray-address", default=None,
                   help="with --ray: a running cluster (auto, or ray://HOST:PORT); default: start one here")
    p.add_argument("--worker-cpus", type=float, default=1.0,
                   help="with --ray: CPUs each actor reserves (its torch threads; default 1)")


class SynthActor:
    """One Ray Data actor: a TTS backend and a SNAC codec, loaded once, making rows block by block."""

    def __init__(self, options: SynthOptions, threads: int) -> None:
        init_worker(options, threads)  # the actor's process is ours: threads set, SNAC fast for any length

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Pairs (index, question, answer) -> (index, the pickled result of :func:`make_row`)."""
        import pyarrow as pa

        indices, results = [], []
        for pair in batch.to_pylist():
            indices.append(pair["index"])
            # Pickled, so that Arrow's type conversion cannot touch a value (and rows and
            # failures, which have different fields, share one column).
            results.append(pickle.dumps(make_row((pair["index"], pair["question"], pair["answer"]))))
        return pa.table({"index": pa.array(indices, pa.int64()), "result": pa.array(results, pa.binary())})


def block_rows(rows: int, workers: int) -> int:
    """Rows per block: about four blocks per actor, at most :data:`MAX_BLOCK_ROWS`, at least 1."""
    return max(1, min(MAX_BLOCK_ROWS, -(-rows // (4 * workers))))


def ray_rows(options: SynthOptions, todo: list[tuple[int, str, str]], worker_cpus: float = 1.0) -> Iterator[dict]:
    """:func:`make_row`'s results for ``todo``, in its order, made by ``options.workers`` actors on Ray Data.

    Ray must be initialized. Closing the generator stops the dataset (and its actors).
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    # Datasets copy the context when they are made; the shared one is put back at once.
    context.execution_options.preserve_order = True  # blocks come back in input order, whoever finishes first
    context.enable_progress_bars = False  # the job's own bar counts rows and shards
    try:
        rows = block_rows(len(todo), options.workers)
        items = [{"index": i, "question": q, "answer": a} for i, q, a in todo]
        dataset = ray.data.from_items(items, override_num_blocks=-(-len(todo) // rows)).map_batches(
            SynthActor, batch_size=rows, batch_format="pyarrow", num_cpus=worker_cpus,
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            fn_constructor_kwargs={"options": options, "threads": max(1, int(worker_cpus))},
        )
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
    expected = iter(todo)
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        for index, blob in zip(batch["index"].to_pylist(), batch["result"].to_pylist(), strict=True):
            want = next(expected)[0]
            if index != want:  # the shards would differ from a local run's: stop rather than write them
                raise MiniOmniError(f"Ray returned row {index} where row {want} was due")
            yield pickle.loads(blob)  # made by our own actors from our own make_row


def synthesize_ray(
    input_path: str | Path,
    out: str | Path,
    options: SynthOptions,
    address: str | None = None,
    worker_cpus: float = 1.0,
    on_shard: Callable[[str | None, JobState], None] | None = None,
) -> dict:
    """:func:`~miniomni.data.synth.synthesize` with the rows made on Ray; returns the manifest.

    Joins the cluster at ``address`` (or a Ray already initialized in this process) or starts a
    local one, only when there are rows to make; a cluster started here is stopped at the end.
    """
    try:
        import ray
        import ray.data  # fail here, not after the first shard
    except ImportError as exc:
        raise MiniOmniError(f"--ray needs Ray Data ({exc}); {install_hint('ray')}") from exc
    if worker_cpus <= 0:
        raise MiniOmniError("--worker-cpus must be positive")
    started = False

    def results(options: SynthOptions, todo: list[tuple[int, str, str]]) -> Iterator[dict]:
        nonlocal started
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address=address, include_dashboard=False)
            started = True
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < options.workers * worker_cpus:
            log.warning("the cluster has %g CPUs; %d actors of %g CPUs will not all start", cpus, options.workers,
                        worker_cpus)
        yield from ray_rows(options, todo, worker_cpus)

    try:
        return synthesize(input_path, out, options, on_shard, results=results)
    finally:
        if started:
            ray.shutdown()
