"""Work in steps: a generator that yields between units of work, so a scheduler can interleave it.

A long computation (the Whisper encoder, a prompt's prefill) written as a generator yields
after each layer; :func:`run` drives it to the end in one go, and a scheduler can instead
advance it one unit at a time between other work (the server's decode steps). Both run the
very same operations in the same order, so the results are bit for bit the same.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

T = TypeVar("T")

Steps = Generator[None, None, T]  # yields None between units; returns the result


def run(steps: Generator[Any, Any, T]) -> T:
    """Drive ``steps`` to the end and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def within(context: Callable[[], AbstractContextManager], steps: Generator[Any, Any, T]) -> Steps[T]:
    """``steps`` with each unit of work run inside a fresh ``context()`` (autocast, inference mode).

    Thread-local modes must not stay switched on while a scheduler runs other work between
    units, so the context is entered and left around each unit instead of around the whole.
    """
    while True:
        with context():
            try:
                next(steps)
            except StopIteration as done:
                return done.value
        yield
