"""The one CLI scaffold: a settings dataclass whose defaults feed `--help`, then a `-c` YAML file, then the flags
given; every value checked against its field's type (and NaN/inf refused) before use; one error handler that
turns bad input into one `error:` line and a non-zero exit. mlx-lm's CLIs (`build_parser()` + defaults +
`main(argv)`) are the model. Pure Python (yaml only).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import errno
import math
import os
import sys
import threading
import types
import typing
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar, Union

from .errors import OpenELMError

T = TypeVar("T")


class SettingsError(OpenELMError, ValueError):
    """A flag or settings-file value of the wrong type or out of range; the message names it."""


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose absent flags stay absent (SUPPRESS), so that they override the YAML file and no more."""
    p = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    p.add_argument("-c", "--config", help="YAML file of settings (keys are the long flag names, '-' or '_'); "
                                          "flags override it")
    return p


def document_defaults(parser: argparse.ArgumentParser, cls: type) -> None:
    """Append each setting's default (from the dataclass, the one place it lives) to its flag's help."""
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    for action in parser._actions:
        value = defaults.get(action.dest, dataclasses.MISSING)
        if action.help and value not in (None, False, (), [], dataclasses.MISSING) and "(default" not in action.help:
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            action.help += f" (default: {shown})"


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def parse(parser: argparse.ArgumentParser, cls: type[T], argv: Optional[Sequence[str]] = None,
          find_config: Optional[Callable[[str], Path]] = None) -> T:
    """defaults < `-c` YAML < flags, each value type-checked; returns `cls(**values)` (whose `__post_init__`
    checks ranges with `check`)."""
    return cls(**parse_values(parser, cls, argv, find_config))


def parse_values(parser: argparse.ArgumentParser, cls: type, argv: Optional[Sequence[str]] = None,
                 find_config: Optional[Callable[[str], Path]] = None) -> dict:
    """The settings given in the `-c` YAML file and as flags (flags win), type-checked, as {name: value}."""
    document_defaults(parser, cls)
    args = vars(parser.parse_args(argv))
    config = args.pop("config", None)
    values = {}
    if config:
        values.update(read_settings_file(find_config(config) if find_config else Path(config), cls))
    hints = typing.get_type_hints(cls)
    for name, value in args.items():
        values[name] = check_type(value, hints[name], flag_name(name))
    return values


def check_values(values: dict, cls: type, source: str) -> dict:
    """Type-check a dict of settings read from elsewhere (e.g. a run's saved settings), naming `source`."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise SettingsError(f"{source}: unknown settings {unknown}")
    return {k: check_type(v, hints[k], f"{source}: {k}") for k, v in values.items()}


def read_settings_file(path: str | Path, cls: type) -> dict:
    """A YAML settings file as {setting: value}, each value checked against `cls`'s field types; errors name
    the file and the key. The one reader behind every CLI's `-c/--config`."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise SettingsError(f"{path}: cannot read the settings file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise SettingsError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(names))}")
        values[name] = check_type(value, hints[name], f"{path}: {key}")
    return values


def check_type(value: Any, tp: Any, where: str) -> Any:
    """`value` as a `tp` (int, float, bool, str, list, tuple, Optional/Union of them), or SettingsError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for option in options:
            try:
                return check_type(value, option, where)
            except SettingsError as e:
                errors.append(e)
        raise errors[0]
    base = origin or tp
    if base is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{where}: expected true or false, got {value!r}")
        return value
    if base is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SettingsError(f"{where}: expected a whole number, got {value!r}")
        return value
    if base is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SettingsError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise SettingsError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise SettingsError(f"{where}: expected text, got {value!r}")
        return value
    if base in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise SettingsError(f"{where}: expected a list, got {value!r}")
        for v in value:
            if isinstance(v, float) and not math.isfinite(v):
                raise SettingsError(f"{where}: expected finite numbers, got {v!r}")
        return base(value)
    return value


def check(ok: bool, name: str, value: Any, want: str) -> None:
    """Raise SettingsError naming the flag unless `ok` (range checks in each settings `__post_init__`)."""
    if not ok:
        raise SettingsError(f"{flag_name(name)} {value!r}: {want}")


def check_choice(name: str, value: Any, choices: Sequence) -> None:
    check(value in choices, name, value, f"choose one of {', '.join(map(str, choices))}")


# ---------------------------------------------------------------------------------------------------------
# The one error handler


def describe_os_error(e: OSError) -> str:
    """One line for an environment failure, naming the file when the OS gave it."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing{where or ' the output'}; free some space and run again"
    if e.errno == errno.EROFS:
        return f"read-only file system{where}; choose an output path you can write"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}"
    if e.errno == errno.EBUSY:
        return f"device or resource busy{where}"
    return f"{e.strerror or type(e).__name__}{where}" if e.strerror else f"{e}"


def run(body: Callable[[], Optional[int]], prog: str = "") -> int:
    """Call a CLI's body: bad input (OpenELMError), an OS failure or Ctrl-C becomes one line on stderr and a
    non-zero exit code; anything else is a bug and keeps its traceback."""
    prefix = f"{prog}: " if prog else ""
    try:
        code = body()
    except OpenELMError as e:
        print(f"{prefix}error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prefix}error: out of memory; use a smaller model, batch or --max-tokens", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prefix}error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    return 0 if code is None else int(code)


def exit_process(code: int) -> NoReturn:
    """End a CLI process (its `__main__` block) with `code` without the interpreter's teardown: freeing the
    modules of torch (and torch._dynamo, which torch.optim imports) takes ~0.8 s on this project's 2-core CPU,
    after the work is done. Exit handlers still run (atexit, so logging, multiprocessing's child joins and
    weakref finalizers) and stdio is flushed; every file this project writes is closed (atomic writes) by then.
    While a non-daemon thread still runs, or with OPENELM_MLX_FAST_EXIT=off, the normal exit (`sys.exit`)."""
    from . import switches

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    try:
        fast = switches.get("OPENELM_MLX_FAST_EXIT")
    except switches.SwitchError:  # a bad value was reported where the CLI read its switches
        fast = False
    if others or not fast:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to tell it
            pass
    os._exit(code)
