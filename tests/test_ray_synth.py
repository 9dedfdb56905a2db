"""``data synth --ray``: an actor pool on a local Ray cluster makes the local run's files byte for byte, and resumes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import write_tiny_snac

pytest.importorskip("ray", reason="Ray Data is not installed: pip install -e '.[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install -e '.[ray]'")

from miniomni.cli import main
from miniomni.data import SynthOptions, synthesize
from miniomni.data.raysynth import block_rows, synthesize_ray

pytestmark = pytest.mark.slow

# Six rows, two a shard: three shards; row 5 fails (an empty question), so the last shard has one row.
PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("Name a primary color.", "Red is one."),
    ("What is two plus two?", "Four."),
    ("Say hello.", "Hello there!"),
    ("", "An answer to nothing."),
]
SHARDS = ["train-000of001-00000.parquet", "train-000of001-00001.parquet", "train-000of001-00002.parquet"]


def ray_rss_mb() -> dict[str, float]:
    """Resident memory (MB) of this machine's Ray processes (GCS, raylet, workers, actors), by process."""
    found: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="ignore")
            if not any(name in cmdline for name in ("raylet", "gcs_server", "ray::", "default_worker.py", "/ray/")):
                continue
            with open(f"/proc/{pid}/statm") as f:
                found[f"{pid} {cmdline[:60]}"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster for this module (one already running in this process is used and left up)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """The input, the tiny SNAC and the local run's output directory (one process, the reference)."""
    base = tmp_path_factory.mktemp("raysynth")
    snac = base / "snac"
    write_tiny_snac(snac)
    qa = base / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PAIRS))
    manifest = synthesize(qa, base / "local", options(snac))
    assert (manifest["written"], manifest["failed"], manifest["shards"]) == (5, 1, SHARDS)
    return {"snac": snac, "qa": qa, "local": base / "local"}


def options(snac: Path, **overrides) -> SynthOptions:
    return SynthOptions(**{"snac": str(snac), "rows_per_shard": 2, "progress": False, **overrides})


def files(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` (relative path -> bytes)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def assert_same_files(out: Path, reference: Path) -> None:
    got, want = files(out), files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the local run's"


def wait_for_free_cpus(ray, cpus: float, timeout: float = 20.0) -> float:
    """The cluster's free CPUs once they reach ``cpus`` (the actor pool is gone), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (free := ray.available_resources().get("CPU", 0)) < cpus and time.monotonic() < deadline:
        time.sleep(0.2)
    return free


def test_block_rows_spreads_work_over_the_actors():
    assert block_rows(6, 2) == 1
    assert block_rows(100, 2) == 13
    assert block_rows(400_000, 8) == 16


def test_cli_ray_run_writes_the_local_runs_files_byte_for_byte(ray_cluster, job, tmp_path, capsys):
    out = tmp_path / "ray"
    assert main(["data", "synth", "--input", str(job["qa"]), "--out", str(out), "--snac", str(job["snac"]),
                 "--rows-per-shard", "2", "--no-progress", "--ray", "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows_in"], summary["written"], summary["failed"]) == (6, 5, 1)
    # Parquet shards, the state file and the manifest (which holds no time or host) are the same bytes.
    assert_same_files(out, job["local"])
    assert wait_for_free_cpus(ray_cluster, 2) == 2  # the actors were released


def test_ray_run_resumes_after_an_interruption_without_rewriting_shards(ray_cluster, job, tmp_path):
    out = tmp_path / "ray"
    rss: list[dict[str, float]] = []

    def interrupt(name, state):
        rss.append(ray_rss_mb())
        raise KeyboardInterrupt("killed after the first shard")

    with pytest.raises(KeyboardInterrupt):
        synthesize_ray(job["qa"], out, options(job["snac"], workers=2), on_shard=interrupt)
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == SHARDS[:1]
    assert wait_for_free_cpus(ray_cluster, 2) == 2  # closing the rows stopped the actor pool
    first = out / "data" / SHARDS[0]
    before = (first.stat().st_ino, first.stat().st_mtime_ns)
    assert json.loads((out / "state" / "shard-000of001.json").read_text())["done"] == [0, 1]

    seen: list[str | None] = []

    def record(name, state):
        rss.append(ray_rss_mb())
        seen.append(name)

    manifest = synthesize_ray(job["qa"], out, options(job["snac"], workers=2), on_shard=record)
    assert seen == SHARDS[1:]  # the finished shard was skipped, not made again
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == before
    assert (manifest["rows_done"], manifest["written"], manifest["failed"]) == (6, 5, 1)
    assert_same_files(out, job["local"])
    # A finished job run again makes nothing (and starts no actors).
    seen.clear()
    synthesize_ray(job["qa"], out, options(job["snac"], workers=2), on_shard=record)
    assert seen == [] and (first.stat().st_ino, first.stat().st_mtime_ns) == before
    assert_same_files(out, job["local"])
    peak = max(rss, key=lambda r: sum(r.values()))
    print(f"\nRSS of the Ray processes with two synth actors: {sum(peak.values()):.0f} MB")
    for name, mb in sorted(peak.items(), key=lambda kv: -kv[1]):
        print(f"  {mb:6.0f} MB  {name}")
