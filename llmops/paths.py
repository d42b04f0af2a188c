"""Where llmops keeps its files. Everything lives under `$LLMOPS_HOME` so tests and users can move it."""

from __future__ import annotations

import os
from pathlib import Path


def llmops_home() -> Path:
    """`$LLMOPS_HOME`, else `$XDG_CACHE_HOME/llmops`, else `~/.cache/llmops`."""
    if home := os.environ.get("LLMOPS_HOME"):
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "llmops"


def models_dir() -> Path:
    """Converted and packaged models, one folder each."""
    return llmops_home() / "models"


def user_registry_file() -> Path:
    """The user's registry entries (`llmops models add`, trained models)."""
    return llmops_home() / "registry.yaml"


def logs_dir() -> Path:
    return llmops_home() / "logs"
