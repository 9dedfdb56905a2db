"""Tiny random-weight checkpoints in the real file formats, built at test time."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from miniomni.checkpoints import state_dict_to_litgpt
from miniomni.config import OmniConfig
from miniomni.models.omni import OmniModel

TINY_CONFIG = dict(
    n_layer=2,
    n_head=4,
    n_query_groups=2,
    head_size=16,
    n_embd=64,
    intermediate_size=96,
    whisper_adapter_dim=32,
    add_qkv_bias=True,
    rope_base=1_000_000.0,
    norm_eps=1e-6,
)

TINY_SNAC = {
    "sampling_rate": 24000,
    "encoder_dim": 8,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 32,
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": 4096,
    "codebook_dim": 8,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}

SENTENCES = [
    "Héllo wörld, naïve café! 你好，世界。 Emoji: 🎉🙂",
    "What is your name? My name is Omni and I can hear and talk.",
    "How are you feeling today? I feel great, thank you for asking.",
    "The weather is sunny and warm. Let us go for a walk in the park.",
]


try:  # every WebRTC peer of the tests, server and clients, announces loopback only: no traffic leaves it
    from miniomni.server.transports.webrtc import restrict_host_addresses
except ImportError:  # aiortc not installed: the WebRTC tests skip
    pass
else:
    restrict_host_addresses(["127.0.0.1"])


def tiny_config(**overrides) -> OmniConfig:
    return OmniConfig(**{**TINY_CONFIG, **overrides})


def random_omni(config: OmniConfig, seed: int = 0, text_vocab: int | None = None) -> OmniModel:
    """An OmniModel whose every weight is random (norm weights too, so nothing is trivially 1).

    With ``text_vocab``, the text head rows past the tokenizer's vocabulary are zeroed so that
    greedy text is made of real tokens (and so decodes to visible text).
    """
    torch.manual_seed(seed)
    model = OmniModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, 0.3 if "embed" in name else 0.15)
        # Zero the head rows of the audio special ids (_eoa, _pad_a, ...): their logit is 0 while the
        # best of 4096 random code logits is positive, so greedy answers stay valid speech until
        # max_new_tokens, which the streaming tests need. Stop rules are tested on a scripted model.
        head = model.llm.lm_head.weight
        for layer in range(7):
            start = config.text_vocab_size + layer * config.audio_vocab_size
            head[start + 4096 : start + config.audio_vocab_size] = 0.0
        if text_vocab is not None:
            head[text_vocab : config.text_vocab_size] = 0.0
    return model.eval()


def build_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return tokenizer.to_str()


def random_whisper(dims: dict, seed: int):
    """An openai-whisper model (a reference) with every parameter drawn from N(0, 0.05²), in eval mode."""
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(**dims)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def write_tiny_whisper(path: Path, n_state: int = 32, seed: int = 0) -> None:
    import whisper.model as wm

    dims = wm.ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=n_state, n_audio_head=2, n_audio_layer=1,
        n_vocab=64, n_text_ctx=8, n_text_state=n_state, n_text_head=2, n_text_layer=1,
    )
    torch.manual_seed(seed)
    model = wm.Whisper(dims)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.05)
            if name.endswith("ln.weight") or name.endswith("ln_post.weight"):
                param.add_(1.0)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)


def write_tiny_snac(directory: Path, seed: int = 0) -> None:
    from snac import SNAC

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = SNAC(**TINY_SNAC)
    (directory / "config.json").write_text(json.dumps(TINY_SNAC))
    torch.save(model.state_dict(), directory / "pytorch_model.bin")


def write_checkpoint_dir(directory: Path, config: OmniConfig | None = None, seed: int = 0) -> Path:
    """The published layout, with tiny random weights in every real format."""
    config = config or tiny_config()
    directory.mkdir(parents=True, exist_ok=True)
    config.to_yaml(directory / "model_config.yaml")
    tokenizer_json = build_tokenizer_json()
    (directory / "tokenizer.json").write_text(tokenizer_json)
    from tokenizers import Tokenizer

    text_vocab = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    model = random_omni(config, seed, text_vocab=text_vocab)
    torch.save(state_dict_to_litgpt(model.state_dict(), config), directory / "lit_model.pth")
    write_tiny_whisper(directory / "small.pt", n_state=config.whisper_adapter_dim, seed=seed)
    write_tiny_snac(directory / "snac", seed=seed)
    return directory


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint_dir(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def omni(checkpoint_dir: Path):
    from miniomni import load

    return load(checkpoint_dir, device="cpu")


def speech_like(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic voiced-sounding signal (harmonics with a moving pitch, amplitude-modulated)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.2 * voice * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="session")
def question_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "question.wav"
    sf.write(path, speech_like(1.5), 16000, subtype="PCM_16")
    return path


@contextlib.contextmanager
def serving(app, **options):
    """Run an ASGI app with uvicorn on a free 127.0.0.1 port, with the limits of its settings; yields the port."""
    import socket
    import threading
    import time

    import uvicorn

    from miniomni.server.app import uvicorn_options

    settings = getattr(app.state, "settings", None)
    options = {**(uvicorn_options(settings) if settings is not None else {}), **options}

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def engine_fixture(max_answers: int):
    """A module-scoped ``engine`` fixture: an Engine with its own compute thread on the tiny model."""

    @pytest.fixture(scope="module")
    def engine(omni):
        from miniomni.server.engine import Engine

        engine = Engine(omni, max_answers=max_answers)
        yield engine
        engine.close()

    return engine


def port_fixture(settings=None):
    """A module-scoped fixture: the app around the module's ``engine`` with ``settings``, served; its port."""

    @pytest.fixture(scope="module")
    def port(engine):
        from miniomni.server.app import create_app
        from miniomni.server.settings import ServerSettings

        with serving(create_app(engine, settings or ServerSettings())) as port:
            yield port

    return port


def wait_idle(engine, timeout: float = 10.0) -> bool:
    """Wait until the engine has no open session; True if it got there."""
    import time

    deadline = time.time() + timeout
    while engine.active_answers and time.time() < deadline:
        time.sleep(0.02)
    return engine.active_answers == 0


@contextlib.contextmanager
def serve_process(checkpoint_dir: Path, log: Path, *flags: str, api_key: str | None = None):
    """`miniomni serve` in its own process on a free port, up and answering /healthz (asked with ``api_key``
    when the flags give the server one); yields (process, port)."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "miniomni.cli", "serve", "--checkpoint", str(checkpoint_dir),
                                    "--port", str(port), *flags], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
                if httpx.get(f"http://127.0.0.1:{port}/healthz", headers=headers, timeout=2).json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                assert process.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.2)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
