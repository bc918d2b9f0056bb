"""Pretrained files from a local folder, the Hugging Face cache or the hub, failing fast when offline.

    processor = from_local_or_hub(Kosmos2Processor.from_pretrained, "microsoft/kosmos-2-patch14-224")

Used by the backbones (policy.encoders) and the tokenizer (policy.text); standard library only.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe of the Hugging Face endpoint, so an offline box fails in seconds with a clear
    message instead of sitting through the hub client's retries (minutes).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def from_local_or_hub(loader, name_or_path: str):
    """`loader(name, local_files_only=...)`: a local folder or the hub cache first, the network last."""
    if Path(name_or_path).exists():
        return loader(name_or_path, local_files_only=True)
    try:
        return loader(name_or_path, local_files_only=True)  # already in the hub cache
    except (OSError, ValueError) as exc:
        if not hub_reachable():
            raise OSError(
                f"{name_or_path!r} is not a local folder, not in the hub cache, and the hub is unreachable"
            ) from exc
        return loader(name_or_path)
