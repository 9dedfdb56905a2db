"""What each encoder context (how much audio Whisper attends over) does to its features, on real weights and speech.

Whisper base (``miniomni.shipped.whisper_base_ct2``, read without ctranslate2) encodes English
sentences spoken by Piper's joe voice and by espeak-ng, once per context of
``miniomni.audio.ENCODER_CONTEXTS``. Per voice and context it prints one markdown table:

* the mel frames the encoder read (mean over the sentences)
* cosine similarity (mean and lowest) and relative L2 distance (mean, ``||f - f30|| / ||f30||``) of the
  positions Mini-Omni keeps (the first ``whisper_frame_count``), flattened per sentence, against 30's
* word error rate of openai-whisper's decoder, greedy, on every position the encoder produced for that
  context: against the sentences, and against the transcripts from 30's features; and how many
  transcripts ran to the token limit (the decoder repeating itself)

and the encoder's time (median of 5 calls, float32) on 3 s and 8 s of speech per context.

    python benchmarks/encoder_context.py
    python benchmarks/encoder_context.py --no-timing --sentences 6 --voices piper
    python benchmarks/encoder_context.py --avx2       # the whole run limited to AVX2, as most laptops
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soxr
import torch

from miniomni.audio import (
    ENCODER_CONTEXTS,
    N_FRAMES,
    WHISPER_SAMPLE_RATE,
    encoder_mel_frames,
    log_mel_spectrogram,
    whisper_frame_count,
)
from miniomni.data.tts import get_backend
from miniomni.eval.normalize import normalize_text
from miniomni.eval.wer import corpus_wer
from miniomni.precision import AVX2_LIMIT
from miniomni.shipped import whisper_base_ct2

SENTENCES = (
    "What time is it in Tokyo right now?",
    "Please call Doctor Martinez at nine thirty tomorrow morning.",
    "The train to Boston leaves from platform seven at four fifteen.",
    "How many legs does a spider have?",
    "My sister Olivia turned twenty three last Tuesday.",
    "Can you recommend a good book about the history of Rome?",
    "It rained for three days straight, so the river flooded the lower fields near the old mill.",
    "Turn off all the lights in the kitchen, please.",
    "Why is the sky blue during the day but red at sunset?",
    "The meeting has been moved from Monday to Wednesday afternoon.",
    "I need two cups of flour, one egg, and half a cup of milk for this recipe.",
    "Who wrote the play Romeo and Juliet?",
    "The population of the city grew to almost one million people by the year nineteen fifty.",
    "Set a timer for twelve minutes, and tell me when it ends.",
    "What is the difference between a crocodile and an alligator?",
    "Michael and Sarah drove across Canada in a small red van last summer.",
    "Remind me to water the plants on Friday.",
    "The company reported a profit of forty five million dollars in the third quarter.",
    "Is it safe to swim in the lake after a thunderstorm?",
    "Hello, my name is Priya, and I am calling about my order.",
    "How do you say good morning in Spanish?",
    "Mount Everest is about eight thousand eight hundred meters tall.",
    "How do I reset my password if I forgot my email address?",
    "The quick brown fox jumps over the lazy dog.",
    "We should leave early because the traffic on the highway is terrible on Fridays.",
    "Which planet is closest to the sun?",
    "Grandpa Joe fixed the old clock, and now it chimes every hour on the hour.",
    "Play some relaxing jazz music in the living room.",
    "Could you explain how a vaccine teaches the immune system to fight a virus?",
    "The package weighs three point five kilograms.",
    "Emma, did you remember to lock the front door before you left?",
    "Add bananas, coffee, and dish soap to my shopping list.",
    "What is the square root of one hundred and forty four?",
    "The museum is open from ten in the morning until six in the evening, except on holidays.",
    "I think the restaurant on Maple Street serves the best pizza in town.",
    "How far is it from London to Paris by train?",
    "She plays the violin in an orchestra that performs every Saturday night.",
    "Please wake me up at six forty five tomorrow.",
    "Do penguins live at the North Pole or the South Pole?",
    "After the storm, the volunteers spent two weeks repairing roofs and clearing fallen trees from the roads.",
    "What is the weather going to be like this weekend in Chicago?",
    "Thank you so much for all of your help today.",
    "My flight number is United two four eight, and it leaves at noon.",
    "Tell me a short story about a dragon who is afraid of the dark.",
    "When you get to the station, take the number twelve bus toward the harbor and get off at the third stop "
    "near the library.",
    "My grandmother was born in Dublin in nineteen forty two, moved to New York when she was nineteen, and worked "
    "as a nurse for forty years.",
    "Can you explain why the moon looks bigger near the horizon than it does when it is high up in the night sky?",
    "The new bridge will be nearly two kilometers long, will carry six lanes of traffic, and should be finished by "
    "the end of twenty twenty seven.",
    "Before you start the washing machine, check the pockets for coins and tissues, and make sure the door is "
    "closed properly.",
    "If it is still raining tomorrow morning, we will move the picnic indoors to the community hall on Jefferson "
    "Avenue instead.",
    "Doctor Chen said I should drink more water, sleep at least seven hours a night, and walk for thirty minutes "
    "every day.",
    "What are the three most important things I should know before I adopt a puppy from the animal shelter next "
    "weekend?",
    "Last year our little team of six volunteers planted more than four hundred trees along the river, and this "
    "spring we hope to plant five hundred more near the school.",
)
VOICES = ("piper", "espeak")
TIMED_SECONDS = (3.0, 8.0)
RUNS = 5
MAX_TOKENS = 100


def settings_line() -> str:
    """The CPU, PyTorch and its kernel level, and the threads the figures were taken with."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, torch {torch.__version__} (kernels {torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} thread{'' if torch.get_num_threads() == 1 else 's'}, float32")


def load_models(directory: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our Whisper encoder and openai-whisper's model (for its decoder), both float32 on the CPU."""
    from whisper.model import ModelDimensions, Whisper

    from miniomni.checkpoints import load_whisper_encoder
    from miniomni.models.ctranslate2 import whisper_checkpoint_from_ct2

    encoder = load_whisper_encoder(directory).eval().requires_grad_(False)
    checkpoint = whisper_checkpoint_from_ct2(directory)
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    del checkpoint
    return encoder, model.float().eval().requires_grad_(False)


def speak(backend: object, sentence: str) -> np.ndarray:
    """The sentence in the backend's default voice, 16 kHz mono float32."""
    audio, rate = backend.synthesize(sentence)
    audio = np.asarray(audio, dtype=np.float32)
    if rate != WHISPER_SAMPLE_RATE:
        audio = soxr.resample(audio, rate, WHISPER_SAMPLE_RATE, quality="HQ").astype(np.float32)
    return audio


def mel_for(audio: np.ndarray, context: str) -> torch.Tensor:
    """The (1, 80, frames) log-mel the encoder reads for this context."""
    return log_mel_spectrogram(audio)[:, : encoder_mel_frames(len(audio), context)].unsqueeze(0)


def encode(encoder: torch.nn.Module, mel: torch.Tensor) -> torch.Tensor:
    """Every position the encoder produces for this log-mel: (positions, width)."""
    with torch.inference_mode():
        return encoder(mel, allow_short=mel.shape[-1] < N_FRAMES)[0]


def transcribe(model: torch.nn.Module, features: torch.Tensor) -> tuple[str, int]:
    """openai-whisper's greedy English transcript of these encoder features (no timestamps), and its tokens."""
    from whisper.decoding import DecodingOptions, DecodingTask

    options = DecodingOptions(language="en", task="transcribe", without_timestamps=True, fp16=False,
                              sample_len=MAX_TOKENS)
    task = DecodingTask(model, options)
    batch = features.unsqueeze(0)
    task._get_audio_features = lambda mel: batch  # our features, whatever their length
    with torch.inference_mode():
        result = task.run(batch)[0]
    return result.text, len(result.tokens)


def encoder_difference(encoder: torch.nn.Module, model: torch.nn.Module, audio: np.ndarray) -> float:
    """Largest absolute difference between our encoder's 30 s features and openai-whisper's own encoder's."""
    mel = mel_for(audio, "30")
    with torch.inference_mode():
        return (encode(encoder, mel) - model.encoder(mel)[0]).abs().max().item()


def measure_voice(name: str, sentences: list[str], encoder: torch.nn.Module, model: torch.nn.Module) -> dict:
    """Per context: frames read, similarity of the kept features to 30's, transcripts; and the speech lengths."""
    backend = get_backend(name)
    per = {c: {"frames": [], "cosine": [], "relative_l2": [], "text": [], "tokens": []} for c in ENCODER_CONTEXTS}
    seconds = []
    for index, sentence in enumerate(sentences, 1):
        audio = speak(backend, sentence)
        seconds.append(len(audio) / WHISPER_SAMPLE_RATE)
        kept = whisper_frame_count(len(audio))
        reference = None
        for context in ENCODER_CONTEXTS:  # "30" first: the reference
            mel = mel_for(audio, context)
            features = encode(encoder, mel)
            flat = features[:kept].flatten().double()
            if reference is None:
                reference = flat
            row = per[context]
            row["frames"].append(mel.shape[-1])
            row["cosine"].append(torch.nn.functional.cosine_similarity(flat, reference, dim=0).item())
            row["relative_l2"].append(((flat - reference).norm() / reference.norm()).item())
            text, tokens = transcribe(model, features)
            row["text"].append(text)
            row["tokens"].append(tokens)
        print(f"{name} {index}/{len(sentences)} ({seconds[-1]:.1f} s): {per['30']['text'][-1]!r}", file=sys.stderr)
    return {"per": per, "seconds": seconds}


def voice_table(name: str, sentences: list[str], result: dict) -> str:
    """One markdown table of a voice's figures, with a line on its speech."""
    seconds = result["seconds"]
    lines = [f"### {name}: {len(sentences)} sentences, {min(seconds):.1f} to {max(seconds):.1f} s of speech "
             f"(mean {statistics.mean(seconds):.1f} s)", "",
             "| context | mel frames read (mean) | cosine mean | cosine lowest | relative L2 mean "
             f"| WER vs sentences | WER vs 30's transcripts | transcripts cut at {MAX_TOKENS} tokens |",
             "|---|---|---|---|---|---|---|---|"]
    reference_texts = result["per"]["30"]["text"]
    for context in ENCODER_CONTEXTS:
        row = result["per"][context]
        wer = corpus_wer(sentences, row["text"], normalize_text).wer
        changed = corpus_wer(reference_texts, row["text"], normalize_text).wer
        lines.append(f"| {context} | {statistics.mean(row['frames']):.0f} | {statistics.mean(row['cosine']):.5f} "
                     f"| {min(row['cosine']):.5f} | {statistics.mean(row['relative_l2']):.4f} | {100 * wer:.1f}% "
                     f"| {100 * changed:.1f}% | {sum(t >= MAX_TOKENS for t in row['tokens'])} |")
    return "\n".join(lines)


def timing_table(encoder: torch.nn.Module, speech: np.ndarray) -> str:
    """Median milliseconds of the encoder (log-mel excluded) per context on 3 s and 8 s of speech."""
    lines = ["| context | " + " | ".join(f"{s:g} s of speech" for s in TIMED_SECONDS) + " |",
             "|---|" + "---|" * len(TIMED_SECONDS)]
    for context in ENCODER_CONTEXTS:
        cells = []
        for seconds in TIMED_SECONDS:
            mel = mel_for(np.resize(speech, int(seconds * WHISPER_SAMPLE_RATE)), context)
            encode(encoder, mel)  # warm-up
            times = []
            for _ in range(RUNS):
                started = time.perf_counter()
                encode(encoder, mel)
                times.append(1000 * (time.perf_counter() - started))
            cells.append(f"{statistics.median(times):.0f} ms ({mel.shape[-1]} frames)")
        lines.append(f"| {context} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=len(SENTENCES),
                        help=f"how many of the {len(SENTENCES)} sentences each voice speaks (default all)")
    parser.add_argument("--voices", default=",".join(VOICES), help=f"comma-separated subset of {VOICES}")
    parser.add_argument("--no-timing", action="store_true", help="skip the encoder timings")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--avx2", action="store_true",
                        help="run the whole benchmark limited to AVX2 (miniomni.precision.AVX2_LIMIT), in a "
                             "second process")
    args = parser.parse_args()
    voices = [v for v in args.voices.split(",") if v]
    if not voices or set(voices) - set(VOICES):
        parser.error(f"--voices takes a comma-separated subset of {VOICES}, got {args.voices!r}")
    if not 1 <= args.sentences <= len(SENTENCES):
        parser.error(f"--sentences must be between 1 and {len(SENTENCES)}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.avx2:
        argv = [a for a in sys.argv[1:] if a != "--avx2"]
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env={**os.environ, **AVX2_LIMIT})
        sys.exit(done.returncode)
    if args.threads:
        torch.set_num_threads(args.threads)
    sentences = list(SENTENCES[: args.sentences])
    encoder, model = load_models(whisper_base_ct2())
    check = encoder_difference(encoder, model, speak(get_backend(voices[0]), SENTENCES[0]))
    model.encoder = None  # only its decoder is needed from here on
    tables = []
    for name in voices:
        result = measure_voice(name, sentences, encoder, model)
        tables.append(voice_table(name, sentences, result))
    print(f"Whisper base, encoder contexts {', '.join(ENCODER_CONTEXTS)}; {settings_line()}")
    print(f"our encoder against openai-whisper's on 30 s: largest difference {check:.2e}")
    print(f"transcripts: openai-whisper's decoder, greedy, English, no timestamps, at most {MAX_TOKENS} tokens")
    for table in tables:
        print()
        print(table)
    if not args.no_timing:
        speech = speak(get_backend(voices[0]), " ".join(SENTENCES[:4]))
        print()
        print(f"### encoder time, median of {RUNS} ({voices[0]} speech)")
        print()
        print(timing_table(encoder, speech))


if __name__ == "__main__":
    main()
