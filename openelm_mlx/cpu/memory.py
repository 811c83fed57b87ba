"""How the CPU layer holds memory: freed buffers kept for reuse (glibc's heap as the one cache) and weights moved
to cache-line boundaries. Importing it does not import mlx."""

from __future__ import annotations

import sys

from .. import switches

MMAP_THRESHOLD = 256 << 20  # allocations below this come from the heap (glibc's default: 128 KB, rising to 32 MB)
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept for reuse, not given back


def keep_freed_buffers() -> bool:
    """Make glibc keep freed buffers for reuse, and MLX hand its freed buffers to glibc (once per process; whether
    it applies). A prompt's C products return arrays of 5-40 MB; glibc mapped each afresh and unmapped it on
    free, so every product zeroed and faulted its output in again (7% of a 2-thread float16 prompt's time, in
    the kernel). Kept in glibc's heap, a 512-token prompt ran +8-10% (8-bit and float16, 2 threads); and with
    the heap as the one cache, MLX's own buffer cache (limit 0) no longer holds a second set of freed buffers:
    -30 MB peak RSS at every precision of the 270M benchmark, speed alike (docs/cpu-backend.md). Off by
    OPENELM_MLX_KEEP_FREED=0; nothing happens off glibc."""
    global _kept
    if _kept is None:
        _kept = False
        if switches.get("OPENELM_MLX_KEEP_FREED") and sys.platform.startswith("linux"):
            import ctypes

            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):  # musl and other C libraries
                return False
            _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            if _kept:
                import mlx.core as mx

                mx.set_cache_limit(0)
    return _kept


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_kept = None


ALIGN = 64  # bytes: a cache line, the width of an AVX-512 load
ALIGN_MAX_BYTES = 64 << 20  # larger arrays stay put: the copy's transient memory would raise loading's peak RSS


def align_weights(model) -> int:
    """Move each of the model's float32 arrays (up to ALIGN_MAX_BYTES) whose data does not start on a cache line to
    one that does; returns how many moved. MLX's CPU buffers start 8 bytes past a 16-byte boundary, so a row of
    weights straddles cache lines and a 64-byte load reads two: csrc/step.c's AVX-512 float32 rows run only on
    aligned rows (270M float32 decode at 1 thread ~31 -> 32-35 tok/s, alternating processes). Each array is copied
    into a slice, at the right offset, of a new buffer 64 bytes longer (an MLX view: the model's arrays stay MLX
    arrays), one at a time, so loading's peak grows by one array. The other kernels load 16-32 bytes (half, 4/8-bit
    weights: no gain measured, and +5-25 MB peak RSS), so those arrays stay put. Off with
    OPENELM_MLX_ALIGN_WEIGHTS=0."""
    if not switches.get("OPENELM_MLX_ALIGN_WEIGHTS"):
        return 0
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten

    params = dict(tree_flatten(model.parameters()))
    moved = 0
    for name in list(params):
        a = params.pop(name)  # one array at a time: each old buffer is freed as its copy replaces it
        if a.dtype != mx.float32 or a.nbytes > ALIGN_MAX_BYTES or a.size == 0 or _address(a) % ALIGN == 0:
            continue
        raw = a.reshape(-1).view(mx.uint8)
        big = mx.zeros((raw.size + ALIGN,), mx.uint8)
        mx.eval(big)
        start = -_address(big) % ALIGN
        dst = big[start:start + raw.size]
        mx.eval(dst)
        np.asarray(dst)[...] = np.asarray(raw)  # into big's own buffer (dst is a view of it)
        out = dst.view(a.dtype).reshape(a.shape)
        mx.eval(out)
        del a, raw, big, dst
        model.update(tree_unflatten([(name, out)]))
        moved += 1
    return moved


def _address(a) -> int:
    """Where an evaluated MLX array's data starts."""
    import mlx.core as mx
    import numpy as np

    return np.asarray(a.view(mx.uint8)).ctypes.data
