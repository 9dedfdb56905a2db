"""Exceptions with messages a user can act on; the CLI prints them without a traceback."""

# The distribution's name on PyPI ("miniomni" there is an unrelated package); the import name and
# the command are miniomni.
DISTRIBUTION = "miniomni-speech"


def install_hint(extra: str) -> str:
    """How to install an optional part, from PyPI or in a clone of the repository."""
    return f"pip install '{DISTRIBUTION}[{extra}]' (in a clone of the repository: pip install -e '.[{extra}]')"


class MiniOmniError(Exception):
    """Base class: the message says what was wrong and what to do."""


class AudioError(MiniOmniError, ValueError):
    """Input audio is missing, empty, unreadable or otherwise unusable."""


class CheckpointError(MiniOmniError):
    """A checkpoint file is missing, incomplete, unsafe or inconsistent."""


class ConfigError(MiniOmniError, ValueError):
    """A model configuration asks for something this implementation does not support."""
