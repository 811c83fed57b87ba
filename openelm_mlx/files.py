"""Atomic outputs and the `--force` rule, for every writer in the toolkit. Standard library only.

A directory is built in a hidden sibling (`.NAME.tmp-PID-XXXX`) and renamed into place only when complete, so a
destination is either the old output or the whole new one. `--force` replaces only an empty directory or one this
project wrote (every entry is a name it writes); anything else is refused with the entries that are not ours.
Temp siblings left by a killed run (their PID no longer alive) are swept by the next run to the same place.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputExistsError

# Names that openelm-mlx writes into a directory it owns: model dirs (convert, fuse, export), adapter dirs (lora),
# trainer run and checkpoint dirs (train), prepared data.
PROJECT_ENTRIES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "adapter_config.json", "adapters.safetensors", "optimizer.safetensors",
    "[0-9]*_adapters.safetensors", "trainer_state.pt", "train_config.json", "model.json", "metrics.jsonl",
    "loss_curve.png", "checkpoints", "hf", "data", "data-cache", "source-*", "manifest.json", "nodes",
    "source-key.json", "tokens.bin", "offsets.npy", "meta.json",  # the last three: older versions' token cache
    ".*.tmp-*", ".*.old-*",
)


def foreign_entries(path: Path) -> list[str]:
    """The entries of directory `path` that this project does not write (empty: the directory is ours)."""
    return sorted(e.name + ("/" if e.is_dir() else "") for e in Path(path).iterdir()
                  if not any(fnmatch.fnmatchcase(e.name, pat) for pat in PROJECT_ENTRIES))


def check_replaceable(path: str | Path, force: bool, what: str = "--force") -> None:
    """Refuse to replace `path` unless `force` and it is an empty directory or one written by this project."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not force:
        raise OutputExistsError(f"{path} already exists; pass {what} to replace it")
    if path.is_symlink() or not path.is_dir():
        raise OutputExistsError(f"{path} is a file, not an output directory of openelm-mlx; {what} only replaces "
                                "directories this project wrote: choose another path")
    resolved = path.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise OutputExistsError(f"{path} is the current directory (or holds it); {what} will not replace it: "
                                "run from elsewhere or choose another path")
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise OutputExistsError(f"{path} holds files openelm-mlx did not write ({shown}); {what} only replaces "
                                "an empty directory or one this project wrote: move them or choose another path")


@contextlib.contextmanager
def _write_errors(path: Path):
    """Writers in torch, safetensors and mlx report a full disk as RuntimeError ("[write] Unable to write",
    "inline_container.cc ... unexpected pos", "I/O error"): turn those into OSError naming the destination."""
    try:
        yield
    except OSError as e:
        if not e.filename:
            e.filename = str(path)
        raise
    except Exception as e:  # noqa: BLE001 (re-raised unless it is a write failure)
        text = str(e)
        free = shutil.disk_usage(path.parent).free
        if free < (1 << 20) or "No space left" in text:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        if any(w in text for w in ("Unable to write", "I/O error", "inline_container", "[write]")):
            raise OSError(errno.EIO, f"write failed ({text.splitlines()[0][:120]})", str(path)) from None
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(path: Path) -> list[Path]:
    """Remove hidden temp siblings of `path` left by runs that died (their PID is gone); returns them."""
    path = Path(os.path.abspath(path))
    removed = []
    if not path.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for p in path.parent.glob(f".{path.name}.{kind}-*"):
            pid = p.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _temp_sibling(path: Path, kind: str, directory: bool, suffix: str = "") -> Path:
    prefix = f".{path.name}.{kind}-{os.getpid()}-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False):
    """Yield a temp directory that replaces `path` only if the block succeeds (see the module docstring)."""
    path = Path(os.path.abspath(path))  # `.` and `x/..` get a real name, so no `..old-*` litter
    check_replaceable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = _temp_sibling(path, "tmp", directory=True)
    try:
        with _write_errors(path):
            yield tmp
        if path.exists():
            check_replaceable(path, force)  # it may have changed while we worked
            old = _temp_sibling(path, "old", directory=True)
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temp sibling and a rename: readers see the old or the new file, never a part."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = ""):
    """Yield a temp path (ending in `suffix`) in `path`'s directory; it replaces `path` only if the block
    succeeds."""
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = _temp_sibling(path, "tmp", directory=False, suffix=suffix)
    try:
        with _write_errors(path):
            yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
