"""CLI settings with one precedence rule: dataclass defaults < YAML file (`-c/--config`) < flags given."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional, Sequence, TypeVar

import yaml

from .errors import OpenELMError

T = TypeVar("T")


class SettingsError(OpenELMError, ValueError):
    pass


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=None,
                        help="YAML file of settings (keys are the flag names with '_'); flags override it")


def parse_settings(parser: argparse.ArgumentParser, defaults: type[T], argv: Optional[Sequence[str]] = None) -> T:
    """Parse `argv` into a `defaults` dataclass instance.

    Every flag of `parser` except `--config` must be declared with `default=None` so that a flag the user did
    not give is told apart from one set to its default value.
    """
    args = vars(parser.parse_args(argv))
    config = args.pop("config", None)
    values = read_settings_file(config, {f.name for f in dataclasses.fields(defaults)}) if config else {}
    values.update({k: v for k, v in args.items() if v is not None})
    return defaults(**values)


def read_settings_file(path: str | Path, names: set) -> dict:
    """A YAML settings file as {setting: value}; keys may use '-' for '_'; a key not in `names` is an error
    naming the file and the key. The one reader behind every CLI's `-c/--config`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise SettingsError(f"{path}: cannot read the settings file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise SettingsError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(names))}")
        values[name] = value
    return values
