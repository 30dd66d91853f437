"""The user's default settings: a small JSON file read by `%%fabric` and `nbfabric run`, written by the picker."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import platformdirs

from nbfabric.config import RunConfig

CONFIG_ENV = "NBFABRIC_CONFIG"
SETTING_NAMES = ("accelerator", "devices", "strategy", "precision", "num_nodes", "start_method")


def config_path() -> Path:
    """`$NBFABRIC_CONFIG`, else `defaults.json` in the platform's user config directory."""
    override = os.environ.get(CONFIG_ENV)
    return Path(override) if override else _default_path(os.environ.get("XDG_CONFIG_HOME"), os.environ.get("HOME"))


@functools.lru_cache(maxsize=4)
def _default_path(xdg_config_home: str | None, home: str | None) -> Path:
    """Found once for the variables platformdirs reads (every `%%fabric` cell asks)."""
    return Path(platformdirs.user_config_dir("nbfabric")) / "defaults.json"


def load_defaults(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The saved settings ({} when there is no file); a broken file is an error naming it."""
    path = Path(path) if path is not None else config_path()
    if not path.exists():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the nbfabric settings file {path}: {error}. Fix or delete it.") from None
    unknown = sorted(set(settings) - set(SETTING_NAMES)) if isinstance(settings, dict) else ["<not an object>"]
    if unknown:
        raise ValueError(
            f"the nbfabric settings file {path} has unknown entries {', '.join(unknown)}; "
            f"valid ones are {', '.join(SETTING_NAMES)}."
        )
    return settings


def save_defaults(settings: dict[str, Any], path: str | os.PathLike | None = None) -> Path:
    """Validate `settings` and write them atomically; return the file written."""
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(f"unknown settings {', '.join(unknown)}; valid ones are {', '.join(SETTING_NAMES)}")
    RunConfig.resolve(**settings)
    path = Path(path) if path is not None else config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(settings, indent=1) + "\n")
    os.replace(partial, path)
    return path
