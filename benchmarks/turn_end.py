"""Where server VAD ends a spoken turn, and what the model then hears, on real speech and real Whisper weights.

Each sentence (Piper's joe voice and espeak-ng) is streamed at 24 kHz in 20 ms chunks between
1 s stretches of quiet room noise through the server's own turn taking
(:class:`miniomni.server.turns.taking.InputTurns` with Silero VAD, 500 ms of silence), twice:
with the silence dated where the voice fell to the room's level (the server's way) and where
Silero's probability fell (``date_by_level=False``). Per voice and way it prints:

* when the turn was offered (the answer's preparation starts) and taken (the answer may be
  heard), after the last sound of the sentence: mean and largest;
* how much audio after the last sound the turn holds;
* turns withdrawn while the sentence was still being spoken (speech came back after an offer);
* word error rate of Whisper base (``miniomni.shipped.whisper_base_ct2``; openai-whisper's greedy
  decoder over its 30 s window) on the turn's audio, against the sentences;
* cosine similarity of the Whisper features Mini-Omni keeps, the two ways, over their common frames.

    python benchmarks/turn_end.py
    python benchmarks/turn_end.py --sentences 10 --voices piper
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import soxr
import torch
from conversation import pcm16
from encoder_context import SENTENCES, VOICES, encode, load_models, mel_for, speak, transcribe
from talk import RATE, room_noise

from miniomni.audio import WHISPER_SAMPLE_RATE, whisper_frame_count
from miniomni.data.tts import get_backend
from miniomni.eval.normalize import normalize_text
from miniomni.eval.wer import corpus_wer
from miniomni.server.realtime.protocol import TurnDetection
from miniomni.server.turns.taking import InputTurns, TurnEnded, TurnMayEnd, TurnResumed
from miniomni.server.turns.vad import StreamingVAD
from miniomni.shipped import whisper_base_ct2

CHUNK = RATE // 50  # 20 ms, as a Realtime client streams
WAYS = (("the level (the server)", True), ("Silero's probability", False))


def take_turn(audio: np.ndarray, by_level: bool) -> dict:
    """``audio`` (24 kHz) through the server's turn taking: the turn's audio, when it was offered and taken."""
    turns = InputTurns(30.0, TurnDetection())
    turns.start_vad(StreamingVAD(0.5, 500, input_rate=RATE, date_by_level=by_level), 0)
    result = {"offered": None, "withdrawn": 0}
    for start in range(0, len(audio), CHUNK):
        piece = audio[start : start + CHUNK]
        turns.append(pcm16(piece))
        for event in turns.on_vad(turns.vad.process(piece)):
            now = (start + len(piece)) / RATE
            if isinstance(event, TurnMayEnd):
                result["offered"], result["turn_end"] = now, turns.turn_end / RATE
            elif isinstance(event, TurnResumed):
                result["withdrawn"] += 1
            elif isinstance(event, TurnEnded):
                result["taken"] = now
                result["pcm"] = np.frombuffer(event.pcm, dtype="<i2").astype(np.float32) / 32767
                return result
    raise RuntimeError("the VAD never ended the turn")


def measure(voice: str, sentences: list[str], encoder: torch.nn.Module, model: torch.nn.Module) -> list[str]:
    backend = get_backend(voice)
    rng = np.random.default_rng(0)
    per_way: dict[bool, dict[str, list]] = {way: {k: [] for k in ("offered", "taken", "tail", "withdrawn",
                                                                  "text", "features")} for _, way in WAYS}
    for sentence in sentences:
        speech = soxr.resample(speak(backend, sentence), WHISPER_SAMPLE_RATE, RATE).astype(np.float32)
        loud = np.flatnonzero(np.abs(speech) > 0.01)
        speech = speech[: loud[-1] + 1]  # the last sound: the synthesizer's own trailing silence is not speech
        lead = room_noise(1.0, rng)
        audio = np.concatenate([lead, speech, room_noise(1.5, rng)])
        last_sound = (len(lead) + len(speech)) / RATE
        for _, way in WAYS:
            turn = take_turn(audio, way)
            row = per_way[way]
            row["offered"].append(turn["offered"] - last_sound)
            row["taken"].append(turn["taken"] - last_sound)
            row["withdrawn"].append(turn["withdrawn"])
            pcm = soxr.resample(turn["pcm"], RATE, WHISPER_SAMPLE_RATE).astype(np.float32)
            row["tail"].append(turn["turn_end"] - last_sound)
            features = encode(encoder, mel_for(pcm, "30"))
            row["text"].append(transcribe(model, features)[0])
            row["features"].append(features[: whisper_frame_count(len(pcm))])
    level, silero = per_way[True]["features"], per_way[False]["features"]
    cosines = []
    for a, b in zip(level, silero, strict=True):
        n = min(len(a), len(b))
        cosines.append(torch.nn.functional.cosine_similarity(a[:n].flatten(), b[:n].flatten(), dim=0).item())
    lines = [f"\n{voice}: {len(sentences)} sentences; Mini-Omni's features (the frames both turns have) at "
             f"cosine {statistics.mean(cosines):.4f} (lowest {min(cosines):.4f}) the two ways\n",
             "| silence dated by | offered after the last sound (mean, max) | taken (mean, max) | "
             "audio after the last sound | turns withdrawn mid-sentence | Whisper base WER |",
             "|---|---|---|---|---|---|"]
    for label, way in WAYS:
        row = per_way[way]
        wer = corpus_wer(sentences, row["text"], normalize_text).wer
        lines.append(f"| {label} | {1000 * statistics.mean(row['offered']):.0f} ms, "
                     f"{1000 * max(row['offered']):.0f} ms | {1000 * statistics.mean(row['taken']):.0f} ms, "
                     f"{1000 * max(row['taken']):.0f} ms | {1000 * statistics.mean(row['tail']):.0f} ms | "
                     f"{sum(row['withdrawn'])} | {100 * wer:.1f} % |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=len(SENTENCES))
    parser.add_argument("--voices", default=",".join(VOICES))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    encoder, model = load_models(whisper_base_ct2())
    sentences = list(SENTENCES[: args.sentences])
    for voice in args.voices.split(","):
        print("\n".join(measure(voice, sentences, encoder, model)), flush=True)


if __name__ == "__main__":
    main()
