"""Locate a checkpoint or tokenizer directory: a local path, or a Hugging Face hub id resolved
through huggingface_hub's cache (imported lazily; works offline with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os
import re


def resolve_dir(path_or_hub_id: str | os.PathLike, allow_patterns: list[str] | None = None) -> str:
    """A local checkpoint directory, or a hub id fetched through huggingface_hub's cache (works
    offline with HF_HUB_OFFLINE=1 when cached)."""
    name = os.fspath(path_or_hub_id)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise NotADirectoryError(f"{name}: expected a checkpoint directory, found a file")
    if name.startswith((".", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise FileNotFoundError(f"{name}: directory not found (nor a hub id of the form 'owner/name')")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(f"{name}: no such directory; to treat it as a hub id install t5kit[hf]") from None
    try:
        return huggingface_hub.snapshot_download(name, allow_patterns=allow_patterns)
    except Exception as e:  # hub errors have many types; all mean "not obtainable here"
        raise FileNotFoundError(f"{name}: not a local directory, and not obtainable as a hub id "
                                f"({type(e).__name__}: {e})") from None
