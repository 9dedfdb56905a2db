"""``miniomni data synth | inspect``: VoiceAssistant-400K shards from text pairs, resumable and sharded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from conftest import write_tiny_snac

from miniomni.checkpoints import load_codec
from miniomni.cli import main
from miniomni.data import SynthOptions, get_backend, synthesize
from miniomni.data.tts import joe_voice_path
from miniomni.tokens import SAMPLES_PER_FRAME, answer_snac_to_layers

# gpt-omni/VoiceAssistant-400K's parquet columns (question_audio is a `datasets` Audio feature).
VOICE_ASSISTANT_SCHEMA = pa.schema([
    ("split_name", pa.string()),
    ("index", pa.int64()),
    ("round", pa.int64()),
    ("question", pa.string()),
    ("question_audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("answer", pa.string()),
    ("answer_snac", pa.string()),
])

PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("How many legs does a spider have?", "Eight."),
    ("Name a primary color.", "Red is one."),
    ("What is two plus two?", "Four."),
    ("Say hello.", "Hello there!"),
]


@pytest.fixture(scope="module")
def snac_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("snac") / "snac"
    write_tiny_snac(directory)
    return directory


def write_jsonl(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    return path


def read_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "data").glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def options(snac_dir: Path, **overrides) -> SynthOptions:
    return SynthOptions(**{"snac": str(snac_dir), "rows_per_shard": 2, "progress": False, **overrides})


def test_round_trip_schema_audio_and_codes(tmp_path, snac_dir):
    qa = write_jsonl(tmp_path / "qa.jsonl", PAIRS[:3])
    manifest = synthesize(qa, tmp_path / "out", options(snac_dir))
    assert (manifest["rows_in"], manifest["written"], manifest["failed"]) == (3, 3, 0)
    assert manifest["question_hours"] > 0 and manifest["answer_hours"] > 0
    files = sorted((tmp_path / "out" / "data").glob("*.parquet"))
    assert [f.name for f in files] == ["train-000of001-00000.parquet", "train-000of001-00001.parquet"]
    schema = pq.read_schema(files[0])
    assert schema.remove_metadata() == VOICE_ASSISTANT_SCHEMA
    assert json.loads(schema.metadata[b"huggingface"])["info"]["features"]["question_audio"]["_type"] == "Audio"
    codec = load_codec(snac_dir)
    rows = read_rows(tmp_path / "out")
    assert [(r["index"], r["question"], r["answer"], r["round"]) for r in rows] == [
        (i, q, a, 0) for i, (q, a) in enumerate(PAIRS[:3])
    ]
    for row in rows:
        layers = answer_snac_to_layers(row["answer_snac"])
        assert layers.shape[0] == 7 and layers.shape[1] > 5
        assert codec.decode(layers).size == layers.shape[1] * SAMPLES_PER_FRAME
        audio, rate = sf.read(io.BytesIO(row["question_audio"]["bytes"]))
        info = sf.info(io.BytesIO(row["question_audio"]["bytes"]))
        assert (rate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        assert 0.3 < audio.size / rate < 10 and abs(audio).max() > 0.01
        assert row["question_audio"]["path"] == f"question_{row['index']:08d}.wav"
    # The training readers take the synthesized rows as they are, and collate them.
    from miniomni.data.voiceassistant import read_voiceassistant
    from miniomni.tokens import Task

    records = list(read_voiceassistant(tmp_path / "out" / "data", task=Task.A1A2))
    assert [r.answer_text for r in records] == [a for _, a in PAIRS[:3]]
    for record, row in zip(records, rows, strict=True):
        assert record.question_audio is not None and record.question_audio.size > 16000 * 0.3
        assert torch.equal(record.answer_layers, answer_snac_to_layers(row["answer_snac"]))


def test_resume_after_crash_makes_every_row_once(tmp_path, snac_dir):
    qa = write_jsonl(tmp_path / "qa.jsonl", PAIRS)
    out = tmp_path / "out"

    def crash(name, state):
        raise KeyboardInterrupt("killed after the first shard")

    with pytest.raises(KeyboardInterrupt):
        synthesize(qa, out, options(snac_dir), on_shard=crash)
    assert [r["index"] for r in read_rows(out)] == [0, 1]
    # A crash between the shard's rename and the state update leaves a shard no state names.
    orphan = out / "data" / "train-000of001-00001.parquet"
    orphan.write_bytes((out / "data" / "train-000of001-00000.parquet").read_bytes())
    (out / "data" / ".train-000of001-00001.parquet.tmp-1").write_bytes(b"half")
    seen = []
    manifest = synthesize(qa, out, options(snac_dir), on_shard=lambda name, state: seen.append(name))
    assert len(seen) == 2  # rows 2..4 only: 2 rows, then 1
    assert sorted(r["index"] for r in read_rows(out)) == list(range(len(PAIRS)))
    assert (manifest["rows_done"], manifest["written"], manifest["failed"]) == (5, 5, 0)
    assert not list((out / "data").glob(".*"))
    # A finished job run again does nothing.
    assert synthesize(qa, out, options(snac_dir))["written"] == 5
    assert len(read_rows(out)) == 5


@pytest.mark.slow
def test_shards_cover_every_row_once(tmp_path, snac_dir):
    qa = write_jsonl(tmp_path / "qa.jsonl", PAIRS)
    out = tmp_path / "out"
    synthesize(qa, out, options(snac_dir, shard=(0, 2)))
    assert sorted(r["index"] for r in read_rows(out)) == [0, 2, 4]
    manifest = synthesize(qa, out, options(snac_dir, shard=(1, 2), workers=2))
    rows = read_rows(out)
    assert sorted(r["index"] for r in rows) == list(range(len(PAIRS)))
    assert (manifest["written"], manifest["jobs"]) == (5, ["0/2", "1/2"])
    by_index = {r["index"]: r for r in rows}
    assert by_index[3]["answer"] == "Four." and by_index[3]["answer_snac"].startswith("# ")


def test_bad_rows_are_skipped_and_listed(tmp_path, snac_dir):
    long_question = "Please tell me, in great detail, everything about the history of the world. " * 12
    pairs = [("", "An answer to nothing."), (long_question, "No."), ("Is this fine?", "Yes. " * 20), PAIRS[0]]
    qa = write_jsonl(tmp_path / "qa.jsonl", pairs)
    manifest = synthesize(qa, tmp_path / "out", options(snac_dir, max_answer_frames=40))
    assert [r["index"] for r in read_rows(tmp_path / "out")] == [3]
    reasons = {f["index"]: f["reason"] for f in manifest["failures"]}
    assert reasons[0] == "empty question"
    assert "question audio is" in reasons[1] and "> 30 s" in reasons[1]
    assert "SNAC frames (> 40)" in reasons[2]
    assert (manifest["written"], manifest["failed"]) == (1, 3)


@pytest.mark.slow
def test_piper_backend_speaks_with_the_joe_voice(tmp_path, snac_dir):
    assert joe_voice_path().name == "en_US-joe-medium.onnx"
    backend = get_backend("piper")
    audio, rate = backend.synthesize("Hello, how are you today?", backend.question_voice(0))
    assert rate == 22050 and audio.dtype.name == "float32" and 0.5 < audio.size / rate < 5
    assert abs(audio).max() > 0.05
    qa = write_jsonl(tmp_path / "qa.jsonl", PAIRS[:1])
    manifest = synthesize(qa, tmp_path / "out", options(snac_dir, tts="piper"))
    assert manifest["written"] == 1 and manifest["settings"]["tts"] == "piper"


def test_cli_synth_and_inspect(tmp_path, snac_dir, capsys):
    csv_path = tmp_path / "qa.csv"
    csv_path.write_text("question,answer\n" + "".join(f'"{q}","{a}"\n' for q, a in PAIRS[:2]))
    out = tmp_path / "out"
    assert main(["data", "synth", "--input", str(csv_path), "--out", str(out), "--snac", str(snac_dir),
                 "--voice", "en-gb", "--voice", "en-us+f3:170:60", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows_in"], summary["written"], summary["failed"]) == (2, 2, 0)
    assert main(["data", "inspect", str(out), "--row", "1", "--wav", str(tmp_path / "a.wav"),
                 "--question-wav", str(tmp_path / "q.wav"), "--snac", str(snac_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 2 and report["shards"] == 1
    assert report["row"]["question"] == PAIRS[1][0]
    frames = report["row"]["answer_frames"]
    info = sf.info(tmp_path / "a.wav")
    assert (info.samplerate, info.frames) == (24000, frames * SAMPLES_PER_FRAME)
    assert sf.info(tmp_path / "q.wav").samplerate == 16000
    assert report["answer_seconds"]["total"] > 0 and report["question_seconds"]["min"] > 0.3
    # Errors are one line and exit code 2.
    assert main(["data", "synth", "--input", str(csv_path), "--out", str(out), "--snac", str(tmp_path)]) == 2
    assert "no SNAC codec" in capsys.readouterr().err
    assert main(["data", "synth", "--input", str(csv_path), "--out", str(out), "--snac", str(snac_dir),
                 "--shard", "2/2"]) == 2


@pytest.mark.slow
def test_killed_process_then_rerun_makes_every_row_once(tmp_path, snac_dir):
    """A real crash: the synth process is killed (SIGKILL) once its first shard is on disk."""
    import signal
    import subprocess
    import sys
    import time

    qa = write_jsonl(tmp_path / "qa.jsonl", PAIRS * 4)  # 20 rows, one per shard
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "miniomni.cli", "-q", "data", "synth", "--input", str(qa), "--out", str(out),
           "--snac", str(snac_dir), "--rows-per-shard", "1", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "data").glob("*.parquet")) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "synthesis finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(list((out / "data").glob("*.parquet")))
    assert 1 <= done_before < 20
    rerun = subprocess.run(cmd, capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr.decode()
    rows = read_rows(out)
    assert sorted(r["index"] for r in rows) == list(range(20))
    assert [r["question"] for r in sorted(rows, key=lambda r: r["index"])] == [q for q, _ in PAIRS * 4]
    assert json.loads((out / "manifest.json").read_text())["written"] == 20
