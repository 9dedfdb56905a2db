"""Exceptions with messages a user can act on; the CLI prints them without a traceback."""


class MiniOmniError(Exception):
    """Base class: the message says what was wrong and what to do."""


class AudioError(MiniOmniError, ValueError):
    """Input audio is missing, empty, unreadable or otherwise unusable."""


class CheckpointError(MiniOmniError):
    """A checkpoint file is missing, incomplete, unsafe or inconsistent."""


class ConfigError(MiniOmniError, ValueError):
    """A model configuration asks for something this implementation does not support."""
