"""Semantic VAD's end-of-turn model: Smart Turn v3 (Daily/pipecat, BSD-2-Clause), run with onnxruntime.

The network is a Whisper-tiny encoder with a one-logit head (an 8 MB int8 ONNX graph, 23
languages). It hears the last 8 s of a turn at 16 kHz, zero-padded at the front when shorter
and normalised to zero mean and unit variance, as Whisper's 80-bin log-mel spectrogram
(:func:`miniomni.audio.log_mel_numpy`, no PyTorch on this thread: 800 frames of 10 ms). Its output ``logits``
is already the probability that the speaker has finished (above 0.5: complete).

The weights, first found first: a path given to ``miniomni serve --turn-model``; the file
``miniomni download DIR`` fetches into DIR from the hub repo ``pipecat-ai/smart-turn-v3``
(used when serving ``--checkpoint DIR``); the copy inside the ``pipecat-ai`` wheel, found by
path (pipecat itself is never imported, so its dependencies need not be installed).

A decision takes a few tens of milliseconds of one core. They run one at a time on a worker
thread of their own, each with one onnxruntime thread: the event loop never waits for them,
and they take at most one core from the compute thread.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soxr

from ...audio import HOP_LENGTH, WHISPER_SAMPLE_RATE, log_mel_numpy
from ...errors import CheckpointError, MiniOmniError, install_hint
from ..realtime.protocol import PROTOCOL_SAMPLE_RATE, pcm16_to_float

log = logging.getLogger(__name__)

TURN_MODEL_REPO = "pipecat-ai/smart-turn-v3"
TURN_MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
WHEEL_DATA = ("audio", "turn", "smart_turn", "data")  # where the pipecat-ai wheel keeps it, under pipecat/
WINDOW_SECONDS = 8
WINDOW = WINDOW_SECONDS * WHISPER_SAMPLE_RATE  # 128000 samples the model hears
FRAMES = WINDOW // HOP_LENGTH  # 800 log-mel frames
NORM_EPS = 1e-7  # as transformers' zero_mean_unit_var_norm
FIX = ("run `miniomni download DIR` (it fetches the model from the hub repo pipecat-ai/smart-turn-v3) and serve with "
       "--checkpoint DIR, or serve with --turn-model PATH, or `pip install --no-deps pipecat-ai` on the server (its "
       "wheel ships the file); until then use turn_detection \"server_vad\"")


class TurnModelUnavailable(MiniOmniError):
    """No end-of-turn model here (no file, or no onnxruntime): semantic VAD cannot run."""


def turn_features(audio: np.ndarray) -> np.ndarray:
    """16 kHz float audio (the turn so far) -> the model's ``input_features`` for it, float32 (80, 800).

    The last 8 s, zero-padded at the front, normalised over all 8 s (padding included, as
    Smart Turn's own inference normalises the padded window), then Whisper's log-mel.
    """
    x = np.asarray(audio, dtype=np.float32).reshape(-1)[-WINDOW:]
    if x.size < WINDOW:
        x = np.pad(x, (WINDOW - x.size, 0))
    x = (x - x.mean()) / np.sqrt(x.var() + NORM_EPS)
    return log_mel_numpy(x)  # (80, FRAMES): the last STFT frame is dropped


def wheel_turn_model() -> Path | None:
    """The model file inside the installed ``pipecat-ai`` wheel, or None (the package is located, not imported)."""
    try:
        spec = importlib.util.find_spec("pipecat")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root).joinpath(*WHEEL_DATA, TURN_MODEL_FILE)
        if path.is_file():
            return path
    return None


def find_turn_model(path: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None) -> Path:
    """The end-of-turn model file: ``path`` if given, else ``checkpoint``'s downloaded copy, else the wheel's.

    Raises :class:`TurnModelUnavailable` naming the fix when there is none.
    """
    if path is not None:
        if not Path(path).is_file():
            raise TurnModelUnavailable(f"the end-of-turn model file {path} does not exist; {FIX}")
        return Path(path)
    if checkpoint is not None and (Path(checkpoint) / TURN_MODEL_FILE).is_file():
        return Path(checkpoint) / TURN_MODEL_FILE
    wheel = wheel_turn_model()
    if wheel is not None:
        return wheel
    raise TurnModelUnavailable(f"semantic_vad needs the Smart Turn v3 end-of-turn model ({TURN_MODEL_FILE}) and "
                               f"this server has none: {FIX}")


def turn_model_for_serving(path: str | None, checkpoint: str | None) -> str | None:
    """``miniomni serve``'s model file (None: semantic VAD unavailable, with a warning); a missing ``path`` raises."""
    try:
        found = find_turn_model(path, checkpoint)
    except TurnModelUnavailable as exc:
        if path is not None:
            raise
        log.warning("semantic_vad is unavailable: %s", exc)
        return None
    log.info("semantic_vad's end-of-turn model: %s", found)
    return str(found)


def download_turn_model(directory: str | os.PathLike) -> Path:
    """Fetch the model file from the hub into ``directory`` (kept if already there). Needs internet."""
    from huggingface_hub import hf_hub_download

    from ...hub import host_resolves, manual_download_hint

    directory = Path(directory)
    target = directory / TURN_MODEL_FILE
    if target.is_file():
        log.info("%s already present", target)
        return target
    directory.mkdir(parents=True, exist_ok=True)
    hint = (manual_download_hint(directory, [(TURN_MODEL_REPO, TURN_MODEL_FILE, directory)])
            + ". The server also finds the copy inside the pipecat-ai wheel (pip install --no-deps pipecat-ai)")
    if not host_resolves():
        raise CheckpointError(f"cannot reach the Hugging Face Hub to download the end-of-turn model {TURN_MODEL_FILE} "
                              f"from {TURN_MODEL_REPO}: its host name does not resolve, so this machine looks "
                              f"offline. {hint}")
    log.info("downloading %s from %s into %s", TURN_MODEL_FILE, TURN_MODEL_REPO, directory)
    try:
        hf_hub_download(repo_id=TURN_MODEL_REPO, filename=TURN_MODEL_FILE, local_dir=directory)
    except Exception as exc:  # huggingface_hub raises many types (offline, HTTP, timeouts)
        raise CheckpointError(f"could not download the end-of-turn model {TURN_MODEL_FILE} from the Hugging Face "
                              f"Hub repo {TURN_MODEL_REPO} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}). This machine may be offline or "
                              f"unable to reach huggingface.co. {hint}") from exc
    return target


class EndOfTurnModel:
    """Smart Turn v3 in an onnxruntime session with one thread: turn audio -> probability that it is complete."""

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise TurnModelUnavailable(f"semantic_vad needs onnxruntime on the server ({exc}): "
                                       f"{install_hint('server')}") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one core at most: the compute thread keeps the others
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's errors for a bad file vary
            raise TurnModelUnavailable(f"the end-of-turn model {path} could not be loaded ({exc}); {FIX}") from exc
        self.path = Path(path)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """``input_features`` (B, 80, 800) -> the probability that each turn is complete, (B,)."""
        (logits,) = self.session.run(["logits"], {"input_features": np.asarray(features, dtype=np.float32)})
        return logits[:, 0]

    def probability(self, audio: np.ndarray, sample_rate: int = WHISPER_SAMPLE_RATE) -> float:
        """The probability that the turn ``audio`` (float samples, the turn so far) is complete."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if sample_rate != WHISPER_SAMPLE_RATE:
            keep = (WINDOW_SECONDS + 1) * sample_rate  # only the end is heard: resample a little more than 8 s
            audio = soxr.resample(audio[-keep:], sample_rate, WHISPER_SAMPLE_RATE, quality="HQ")
        return float(self.probabilities(turn_features(audio)[None])[0])

    def probability_pcm(self, pcm: bytes) -> float:
        """:meth:`probability` of protocol audio (16-bit PCM at 24 kHz)."""
        return self.probability(pcm16_to_float(pcm[-(WINDOW_SECONDS + 1) * PROTOCOL_SAMPLE_RATE * 2 :]),
                                PROTOCOL_SAMPLE_RATE)

    def ask(self, pcm: bytes, on_answer: Callable[[float | None], None]) -> None:
        """Judge the turn ``pcm`` on the end-of-turn thread; ``on_answer`` gets the probability on this event loop.

        It gets None when the model failed (logged): the eagerness cap then ends the turn.
        """
        def judge() -> float:
            started = time.perf_counter()
            probability = self.probability_pcm(pcm)
            log.debug("end-of-turn probability %.3f for %.2f s of turn (%.0f ms)", probability,
                      len(pcm) / 2 / PROTOCOL_SAMPLE_RATE, 1000 * (time.perf_counter() - started))
            return probability

        future = asyncio.get_running_loop().run_in_executor(_executor(), judge)

        def done(result: Future) -> None:
            if result.cancelled():
                return
            if result.exception() is not None:
                log.error("the end-of-turn model failed", exc_info=result.exception())
                on_answer(None)
            else:
                on_answer(result.result())

        future.add_done_callback(done)


_lock = threading.Lock()
_models: dict[Path, EndOfTurnModel] = {}
_worker: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _worker
    with _lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="miniomni-end-of-turn")
        return _worker


def load_turn_model(path: str | os.PathLike | None = None) -> EndOfTurnModel:
    """The process's model for ``path`` (see :func:`find_turn_model`), loaded once and shared by every connection."""
    found = find_turn_model(path).resolve()
    with _lock:
        if found not in _models:
            _models[found] = EndOfTurnModel(found)
        return _models[found]
