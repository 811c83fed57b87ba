"""Optimized BLAS for MLX's Linux CPU backend, loaded before mlx is first imported.

The Linux `mlx[cpu]` wheel links its own copy of the netlib *reference* BLAS (`mlx_cpu.libs/libblas-*.so`), so
float32 matmuls run at a few GFLOP/s. libmlx binds `cblas_sgemm` & co. by name when it is loaded; a library
loaded earlier with RTLD_GLOBAL is searched first, so an optimized BLAS exporting the same unprefixed `cblas_*`
/ LAPACK symbols takes over every MLX CPU matmul. Loading it after `mlx.core` does nothing (measured), hence the
call from `openelm_mlx/__init__.py` and the warning when mlx came first.

In front of OpenBLAS goes a small `cblas_sgemm` (csrc/gemv_shim.c, built with the system C compiler on first use
and cached) for decode's few-row products: OpenBLAS 0.3.21 packs the whole weight matrix for such an sgemm, which
halves one-sequence decode and makes a batch of 4 cost as much as one of 16. Linear-layout products with up to
KERNEL_ROWS rows go to the shim's own kernel (AVX2 + FMA or portable C, threads = cores), other one-row products to
`cblas_sgemv`. `OPENELM_MLX_GEMV=sgemv` keeps only the sgemv forwarding, `OPENELM_MLX_GEMV=0` leaves the shim out.

Order: `OPENELM_MLX_BLAS=/path/lib.so` (`none` turns the whole thing off), the system OpenBLAS (Debian/Ubuntu
`libopenblas0-pthread`, Fedora, Arch, conda; also found via `ldconfig -p`), then `libmkl_rt` from the `mkl`
wheel. Nothing happens off Linux (macOS uses Accelerate). Only the standard library is imported here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .. import switches

ENV_VAR = "OPENELM_MLX_BLAS"
GEMV_ENV_VAR = "OPENELM_MLX_GEMV"
SPLIT_ENV_VAR = "OPENELM_MLX_SPLIT_SGEMM"
CACHE_ENV_VAR = "OPENELM_MLX_CACHE"
SHIM_SOURCE = Path(__file__).with_name("csrc") / "gemv_shim.c"
# The shim's kernel variants (its VAR_* codes) and the rows M of the products each takes, (min, max): where it beat
# OpenBLAS 0.3.21's sgemm on a 270M shape (docs/cpu-backend.md); the portable loop only at few rows.
KERNEL_VARIANTS = {"portable": 1, "avx2": 2}
KERNEL_ROWS = {"avx2": (1, 32), "portable": (2, 4)}


class BlasPreloadWarning(RuntimeWarning):
    """The optimized BLAS could not be loaded (bad OPENELM_MLX_BLAS path, or mlx imported first)."""


@dataclass(frozen=True)
class BlasStatus:
    """Which BLAS MLX's CPU backend uses in this process."""

    loaded: bool  # an optimized BLAS was loaded globally by this module
    path: Optional[str] = None
    kind: str = "reference"  # "openblas", "mkl", "other" (a library given by OPENELM_MLX_BLAS), or "reference"
    source: str = ""  # "OPENELM_MLX_BLAS", "system", "mkl wheel"
    version: str = ""  # openblas_get_config() / MKL's version string
    reason: str = ""  # why none was loaded
    too_late: bool = False  # mlx.core was imported before openelm_mlx
    gemv_shim: Optional[str] = None  # the loaded csrc/gemv_shim.c library, when few-row matmuls go through it
    gemv_reason: str = ""  # why not, for an OpenBLAS without it
    gemv_kernel: str = ""  # what the shim does with few-row products, e.g. "avx2 kernel for M 1-32, 2 threads"
    split_threads: int = 1  # > 1: the shim splits large products over this many threads of its pool


_status: Optional[BlasStatus] = None
_handles: list = []  # keep the loaded libraries referenced for the life of the process


def _multiarch() -> str:
    import sysconfig

    return sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"


def _known_openblas_paths() -> list[str]:
    """Where distributions put OpenBLAS; the unversioned alternatives link first, so the admin's choice wins."""
    arch = _multiarch()
    paths = []
    for root in (f"/usr/lib/{arch}", f"/lib/{arch}"):
        paths.append(f"{root}/libopenblas.so.0")
        paths += [f"{root}/openblas-{variant}/libopenblas.so.0" for variant in ("pthread", "openmp", "serial")]
    for root in ("/usr/lib64", "/usr/lib", "/usr/local/lib", "/opt/OpenBLAS/lib", f"{sys.prefix}/lib"):
        # Fedora names the pthread build libopenblasp, the OpenMP one libopenblaso.
        paths += [f"{root}/{name}" for name in ("libopenblasp.so.0", "libopenblas.so.0", "libopenblas.so")]
    return paths


@functools.lru_cache(maxsize=1)
def _ldconfig_cache() -> str:
    for exe in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
    return ""


def _ldconfig_paths(prefix: str) -> list[str]:
    """Libraries in the dynamic linker cache (`ldconfig -p`) whose name starts with `prefix`."""
    found = []
    for line in _ldconfig_cache().splitlines():
        name, _, path = line.strip().partition(" => ")
        if name.startswith(prefix) and path:  # a wrong-arch or ILP64 entry fails the probe and is skipped
            found.append(path.strip())
    return found


def _mkl_wheel_paths() -> list[str]:
    """libmkl_rt from the `mkl` wheel (it installs into <prefix>/lib, outside site-packages)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("mkl")
    except metadata.PackageNotFoundError:
        return []
    files = [f for f in dist.files or [] if Path(str(f)).name.startswith("libmkl_rt.so")]
    return [os.path.normpath(dist.locate_file(f)) for f in files]


def candidates() -> Iterator[tuple[str, str]]:
    """(path, source) pairs to try after OPENELM_MLX_BLAS, best first; the ldconfig lookup runs only if needed."""
    seen = set()
    groups = (
        ("system", lambda: [p for p in _known_openblas_paths() if os.path.exists(p)]),
        ("system", lambda: _ldconfig_paths("libopenblas")),
        ("mkl wheel", _mkl_wheel_paths),
        ("system", lambda: _ldconfig_paths("libmkl_rt")),
    )
    for source, find in groups:
        for path in find():
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                yield path, source


def _identify(lib: ctypes.CDLL) -> tuple[str, str]:
    """(kind, version) of a loaded BLAS from its own introspection functions."""
    if hasattr(lib, "openblas_get_config"):
        lib.openblas_get_config.restype = ctypes.c_char_p
        return "openblas", lib.openblas_get_config().decode(errors="replace").strip()
    if hasattr(lib, "MKL_Get_Version_String"):
        buf = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(buf, len(buf))
        return "mkl", buf.value.decode(errors="replace").strip()
    return "other", ""


def _try_load(path: str) -> tuple[Optional[ctypes.CDLL], str]:
    """Load `path` privately if it is a BLAS with unprefixed cblas symbols; else (None, what is wrong). A library
    without the symbols never enters the global scope."""
    if os.sep in path and not os.path.exists(path):  # a bare name like libmkl_rt.so.2 is left to dlopen's search
        return None, f"{path} does not exist"
    try:
        probe = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
    except OSError as exc:
        return None, f"{path} could not be loaded ({exc})"
    if not hasattr(probe, "cblas_sgemm"):
        return None, f"{path} does not export cblas_sgemm (not a CBLAS library, or its symbols are prefixed)"
    return probe, ""


def _cache_dir() -> Path:
    if switches.get(CACHE_ENV_VAR):
        return Path(switches.get(CACHE_ENV_VAR))
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openelm_mlx"


def build_c_library(source_path: Path, flags: tuple = (), extra_sources: tuple = ()) -> tuple[Optional[str], str]:
    """Compile a csrc/ file (with `extra_sources` linked into the same library) into a shared library once per
    source version, machine, compiler and `flags` (extra compiler/linker flags; cached under _cache_dir(), written
    atomically); returns (path, "") or (None, why it could not be built)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None, "no C compiler (cc) to build it"
    sources = (source_path, *extra_sources)
    source = b"".join(p.read_bytes() for p in sources)  # with the headers beside it (csrc/pool.h), which it may include
    source += b"".join(h.read_bytes() for h in sorted(source_path.parent.glob("*.h")))
    key = hashlib.sha256(source + f"{platform.machine()} {compiler} {' '.join(flags)}".encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source_path.stem}-{key}.so"
    if target.exists():
        return str(target), ""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        cmd = [compiler, "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-o", str(tmp), *map(str, sources), *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            return None, f"building {source_path.name} with {compiler} failed ({last})"
        os.replace(tmp, target)  # atomic: a concurrent process sees the whole library or none
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"building {source_path.name} failed ({exc})"
    finally:
        tmp.unlink(missing_ok=True)
    return str(target), ""


def build_gemv_shim() -> tuple[Optional[str], str]:
    """csrc/gemv_shim.c, built (see build_c_library)."""
    return build_c_library(SHIM_SOURCE, ("-ldl", "-pthread"))


def _cores() -> int:
    """CPUs this process may run on (the kernel's thread count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _blas_threads() -> int:
    """The threads the BLAS would use: OPENBLAS_NUM_THREADS (or OMP_NUM_THREADS) where set, else every core."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return min(_cores(), 16)


def _configure_kernel(shim: ctypes.CDLL, setting: str) -> str:
    """Tell the shim which few-row products its kernel takes (by the switch and this CPU); returns what it does."""
    if setting == "sgemv":
        return ""
    available = [name for name, bit in KERNEL_VARIANTS.items() if shim.openelm_smallm_variants() & bit]
    variant = "portable" if setting == "portable" or "avx2" not in available else "avx2"
    lo, hi = KERNEL_ROWS[variant]
    threads = min(_cores(), 16)
    shim.openelm_gemv_shim_configure(lo, hi, threads, KERNEL_VARIANTS[variant])
    return f"{variant} kernel for M {lo}-{hi}, {threads} thread{'s' if threads > 1 else ''}"


def _load_gemv_shim(blas_path: str) -> tuple[Optional[str], str, str, int]:
    """Put the shim's cblas_sgemm into the global scope, bound to `blas_path` and configured; must run before that
    BLAS goes global, so that libmlx finds the shim first. Returns (path, why not, what its kernel does, the threads
    it splits large products over)."""
    setting = switches.get(GEMV_ENV_VAR)
    if setting == "off":
        return None, f"turned off by {GEMV_ENV_VAR}", "", 1
    path, problem = build_gemv_shim()
    if path is None:
        return None, problem, "", 1
    try:
        shim = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
        code = shim.openelm_gemv_shim_init(os.fsencode(blas_path))
        kernel = _configure_kernel(shim, setting) if code == 0 else ""
        split = shim.openelm_gemv_shim_split(_blas_threads()) if code == 0 and switches.get(SPLIT_ENV_VAR) else 1
    except (OSError, AttributeError) as exc:
        return None, f"{path} could not be loaded ({exc})", "", 1
    if code != 0:
        return None, f"{path} could not bind cblas_sgemm/cblas_sgemv of {blas_path} (code {code})", "", 1
    _handles.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))  # promoted to global only once bound
    return path, "", kernel, split


def _load(path: str, source: str) -> tuple[Optional[BlasStatus], str]:
    probe, problem = _try_load(path)
    if probe is None:
        return None, problem
    kind, version = _identify(probe)
    shim, shim_problem, kernel, split = _load_gemv_shim(path) if kind == "openblas" else (None, "", "", 1)
    _handles.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
    return BlasStatus(loaded=True, path=path, kind=kind, source=source, version=version, gemv_shim=shim,
                      gemv_reason=shim_problem, gemv_kernel=kernel, split_threads=split), ""


def preload() -> BlasStatus:
    """Find and globally load an optimized BLAS, once per process; returns (and records) what is in use."""
    global _status
    if _status is None:
        _status = _preload()
    return _status


def _preload() -> BlasStatus:
    if not sys.platform.startswith("linux"):
        return BlasStatus(loaded=False, kind="platform", reason=f"not needed on {sys.platform}")
    setting = switches.get(ENV_VAR) or ""
    if setting == "none":
        return BlasStatus(loaded=False, reason=f"turned off by {ENV_VAR}=none")
    if "mlx.core" in sys.modules:
        # libmlx has bound its reference BLAS already; loading now would change nothing (measured).
        available = setting if setting and setting.lower() != "auto" else next(candidates(), (None,))[0]
        if available:
            warnings.warn(f"mlx was imported before openelm_mlx, so MLX keeps its slow reference BLAS on CPU "
                          f"instead of {available}; import openelm_mlx first (or set {ENV_VAR}=none)",
                          BlasPreloadWarning, stacklevel=3)
        return BlasStatus(loaded=False, reason="mlx.core was imported before openelm_mlx", too_late=True)
    if setting and setting.lower() != "auto":
        status, problem = _load(setting, ENV_VAR)
        if status is not None:
            return status
        warnings.warn(f"{ENV_VAR}={setting!r}: {problem}; falling back to automatic detection",
                      BlasPreloadWarning, stacklevel=3)
    problems = []
    for path, source in candidates():
        status, problem = _load(path, source)
        if status is not None:
            return status
        problems.append(problem)
    reason = "no optimized BLAS found (on Debian/Ubuntu: apt-get install libopenblas0-pthread)"
    return BlasStatus(loaded=False, reason="; ".join([reason] + problems))


def status() -> BlasStatus:
    """What `preload` did in this process (running it if the package import did not)."""
    return preload()


@functools.lru_cache(maxsize=1)
def sgemm_address() -> Optional[int]:
    """The address of the `cblas_sgemm` that MLX's CPU matmuls call here (the optimized BLAS loaded by `preload`, or
    the shim in front of it), for C code that multiplies through the same BLAS; None when none was loaded."""
    if not status().loaded:
        return None
    try:
        return ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        return None


def _threads(kind: str) -> Optional[int]:
    name = {"openblas": "openblas_get_num_threads", "mkl": "MKL_Get_Max_Threads"}.get(kind)
    if not _handles or name is None or not hasattr(_handles[-1], name):
        return None
    return int(getattr(_handles[-1], name)())


def describe() -> str:
    """One line for `--verbose` output and `python -m openelm_mlx.info`: which BLAS MLX's CPU backend uses."""
    s = status()
    if s.loaded:
        name = {"openblas": "OpenBLAS", "mkl": "Intel MKL"}.get(s.kind, "CBLAS library")
        threads = _threads(s.kind) if s.split_threads <= 1 else None  # split: OpenBLAS runs one thread a block
        version = f" [{s.version}]" if s.version else ""
        gemv = ""
        if s.gemv_shim and s.gemv_kernel:
            gemv = f", few-row matmuls on csrc/gemv_shim.c's {s.gemv_kernel}, other M=1 ones via cblas_sgemv"
        elif s.gemv_shim:
            gemv = ", decode's M=1 matmuls via cblas_sgemv"
        elif s.gemv_reason:
            gemv = f", few-row matmuls on sgemm: {s.gemv_reason}"
        if s.split_threads > 1:
            gemv += f", large products split over {s.split_threads} threads of ours, OpenBLAS one thread a block"
        return (f"BLAS: {name} {s.path}{version} (from {s.source}, loaded before mlx"
                f"{f', {threads} threads' if threads else ''}{gemv})")
    if s.kind == "platform":
        return f"BLAS: the platform's own (nothing preloaded: {s.reason})"
    return f"BLAS: MLX's bundled reference BLAS, slow on CPU ({s.reason})"
