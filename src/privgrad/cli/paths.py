"""Output paths of the subcommands: a missing folder is created, a bad one is a one-line error.

``privgrad demo --out`` and ``privgrad epsilon --plot`` both create a missing folder (as
``PrivacyLogger`` does for its CSV), and check it *before* any work runs, so a typo in a path
never costs a training run or a search. No torch.
"""

from __future__ import annotations

from pathlib import Path

from privgrad.errors import ConfigError

__all__ = ["make_folder"]


def make_folder(folder: Path, name: str, value: object, fix: str) -> None:
    """Create ``folder`` (and its parents) unless it exists.

    Raises:
        ConfigError: a part of the path is a file, or the folder cannot be created; ``name``
            and ``value`` are the option as the user gave it, ``fix`` says what to pass.
    """
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{name} must lie in a folder; got {name}={value!r}, where {existing} is a file. {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{name}'s folder must be creatable; got {name}={value!r} ({e.strerror}). {fix}") from e
