"""What every download from the Hugging Face Hub shares: knowing at once when the machine is offline, and saying
how to place the files by hand."""

from __future__ import annotations

from pathlib import Path

__all__ = ["host_resolves", "manual_download_hint"]


def manual_download_hint(directory: Path, plan: list[tuple[str, str, Path]]) -> str:
    """Where each (repo, file, target folder) of ``plan`` goes, for someone copying them from a connected machine."""
    return (
        f"On a connected machine run `miniomni download {directory}` and copy the folder here, "
        "or place the files by hand: " + "; ".join(f"{r}/{f} -> {t / f}" for r, f, t in plan)
    )


def host_resolves() -> bool:
    """False when the hub's host name does not resolve (offline): fail at once instead of retrying."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True  # huggingface_hub answers from its cache or fails at once by itself
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return True
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True
