"""Where loraplex keeps its files, and turning a user's model argument into a checkpoint path."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

DEMO_MODEL = "demo"


class ModelNotFound(ValueError):
    pass


def loraplex_home() -> Path:
    """`$LORAPLEX_HOME` if set, else the user's cache folder for loraplex."""
    home = os.environ.get("LORAPLEX_HOME")
    return Path(home).expanduser() if home else Path(platformdirs.user_cache_dir("loraplex"))


def resolve_model(name_or_path: str, progress: bool = True) -> Path:
    """The checkpoint that `name_or_path` names: "demo" (fetched on first use), a folder, or a .gguf file.

    A .gguf path is returned as it is; `loraplex.model.gguf.read_gguf` reads it.
    """
    if name_or_path == DEMO_MODEL:
        # Imported here because download pulls in torch and transformers, which path lookups do not need.
        from loraplex.download import ensure_demo

        return ensure_demo(progress=progress)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        reason = "it is a folder with no config.json"
    elif path.is_file():
        reason = "it is a file but not a .gguf"
    else:
        reason = "no such file or folder"
    raise ModelNotFound(
        f"cannot use {name_or_path!r} as a model ({reason}); expected a Hugging Face checkpoint folder "
        f'with config.json, a .gguf file, or "{DEMO_MODEL}"'
    )
