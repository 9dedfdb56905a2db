"""What the Realtime ``noise_reduction`` (RNNoise) does to what Whisper hears, on real weights and speech.

English sentences spoken by Piper's joe voice (and espeak-ng with ``--voices piper,espeak``) are
mixed with noise at a set signal-to-noise ratio: white, pink (1/f, like a fan or traffic) and
babble (three other sentences spoken at once by espeak-ng, which a speech denoiser is not meant
to remove); a mix whose peak passes full scale is scaled down to fit, as a microphone's gain
control would. Each mix goes the way a session's input goes (to 24 kHz, 16-bit, in 20 ms
chunks) and is heard as it is and after the server's denoiser; Whisper base
(``miniomni.shipped.whisper_base_ct2``) encodes it with ``serve``'s 10 s context and
openai-whisper's decoder transcribes it greedily. Prints the word error rate per condition, the
denoiser's cost (milliseconds of one core per second of audio) and how far its output trails.

    python benchmarks/denoise.py
    python benchmarks/denoise.py --sentences 24 --voices piper,espeak
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soxr
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_context import SENTENCES, encode, load_models, mel_for, settings_line, speak, transcribe

from miniomni.audio import WHISPER_SAMPLE_RATE
from miniomni.data.tts import get_backend
from miniomni.eval.normalize import normalize_text
from miniomni.eval.wer import corpus_wer
from miniomni.server.realtime.denoise import INPUT_RATE, Denoiser
from miniomni.shipped import whisper_base_ct2

CONTEXT = "10"  # what serve's encoder reads by default
CHUNK = INPUT_RATE * 2 // 50  # 20 ms of 16-bit PCM, as clients append it
CONDITIONS = (("clean", None, None), ("white", "white", 10.0), ("white", "white", 5.0), ("pink", "pink", 5.0),
              ("pink", "pink", 0.0), ("babble", "babble", 5.0))


def noise(kind: str, length: int, rng: np.random.Generator, babble: list[np.ndarray]) -> np.ndarray:
    """Unit-power noise of one kind, ``length`` samples at 16 kHz."""
    if kind == "white":
        out = rng.standard_normal(length)
    elif kind == "pink":  # 1/f power: white noise shaped by 1/sqrt(f) in the frequency domain
        spectrum = np.fft.rfft(rng.standard_normal(length))
        spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
        out = np.fft.irfft(spectrum, length)
    else:  # three other sentences at once, looped to length
        out = np.zeros(length)
        for index in rng.choice(len(babble), 3, replace=False):
            voice = babble[index]
            out += np.resize(voice, length) / (np.sqrt(np.mean(voice**2)) + 1e-9)
    return (out / np.sqrt(np.mean(out**2))).astype(np.float32)


def mix(speech: np.ndarray, kind: str, snr_db: float, rng: np.random.Generator, babble: list[np.ndarray]
        ) -> np.ndarray:
    power = float(np.mean(speech**2))
    mixed = speech + noise(kind, len(speech), rng, babble) * np.sqrt(power / 10 ** (snr_db / 10))
    return mixed / max(1.0, float(np.abs(mixed).max()) / 0.99)


def through_server(audio: np.ndarray, denoise: bool) -> tuple[np.ndarray, float]:
    """The audio as a session hears it (16 kHz -> 24 kHz 16-bit PCM in 20 ms chunks -> 16 kHz), through
    the denoiser or not, and the denoiser's seconds of compute."""
    at_24k = soxr.resample(audio, WHISPER_SAMPLE_RATE, INPUT_RATE, quality="HQ")
    pcm = np.clip(np.rint(at_24k * 32767), -32768, 32767).astype("<i2").tobytes()
    seconds = 0.0
    if denoise:
        started = time.perf_counter()
        denoiser = Denoiser()
        pcm = b"".join(denoiser.process(pcm[i:i + CHUNK]) for i in range(0, len(pcm), CHUNK)) + denoiser.flush()
        seconds = time.perf_counter() - started
    back = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    return soxr.resample(back, INPUT_RATE, WHISPER_SAMPLE_RATE, quality="HQ").astype(np.float32), seconds


def lag_ms(reference: np.ndarray, delayed: np.ndarray) -> float:
    n = min(len(reference), len(delayed), WHISPER_SAMPLE_RATE * 2)
    lag = int(np.argmax(np.correlate(delayed[:n], reference[:n], "full"))) - (n - 1)
    return lag / WHISPER_SAMPLE_RATE * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--voices", default="piper")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder, model = load_models(whisper_base_ct2())
    sentences = list(SENTENCES[: args.sentences])
    espeak = get_backend("espeak")
    babble = [speak(espeak, s) for s in SENTENCES[-12:]]  # never among the heard sentences at <= 40
    print(settings_line())
    print(f"\n{len(sentences)} sentences; Whisper base, {CONTEXT} s context, greedy; word error rate\n")
    print("| voice | noise | SNR | as heard | after RNNoise |")
    print("|---|---|---|---|---|")
    costs, lags = [], []
    for voice in args.voices.split(","):
        backend = get_backend(voice)
        spoken = [speak(backend, s) for s in sentences]
        references = [normalize_text(s) for s in sentences]
        for label, kind, snr in CONDITIONS:
            rng = np.random.default_rng(0)
            heard = {"as heard": [], "after RNNoise": []}
            for audio in spoken:
                noisy = audio if kind is None else mix(audio, kind, snr, rng, babble)
                plain, _ = through_server(noisy, denoise=False)
                clean, seconds = through_server(noisy, denoise=True)
                costs.append(seconds / (len(noisy) / WHISPER_SAMPLE_RATE) * 1000)
                if kind is None:
                    lags.append(lag_ms(plain, clean))
                for name, version in (("as heard", plain), ("after RNNoise", clean)):
                    text, _ = transcribe(model, encode(encoder, mel_for(version, CONTEXT)))
                    heard[name].append(normalize_text(text))
            wers = {name: corpus_wer(references, texts).wer for name, texts in heard.items()}
            print(f"| {voice} | {label} | {'-' if snr is None else f'{snr:g} dB'} | {wers['as heard']:.1%} | "
                  f"{wers['after RNNoise']:.1%} |", flush=True)
    print(f"\nRNNoise: {statistics.median(costs):.1f} ms of one core per second of audio (median of {len(costs)}, "
          f"20 ms chunks, resampling included); its output trails the input by {statistics.median(lags):.0f} ms")


if __name__ == "__main__":
    main()
