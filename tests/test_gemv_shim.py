"""csrc/gemv_shim.c's small-M kernel against a float64 numpy product: every row count it takes, odd shapes, both
layouts of x, padded leading dimensions, BLAS alpha/beta semantics (beta == 0 never reads c), both variants, and
the invariances the C file states (threads, batch rows). Called directly through ctypes, so no BLAS is involved."""

from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest

from openelm_mlx import switches
from openelm_mlx.cpu import blas

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    if not any(map(shutil.which, ("cc", "gcc", "clang"))):
        pytest.skip("no C compiler")
    with switches.override(CACHE=str(tmp_path_factory.mktemp("kernels"))):
        path, problem = blas.build_gemv_shim()
    assert path, problem
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.openelm_smallm_sgemm.argtypes = [I] * 6 + [F, P, I, P, I, F, P, I, I, I]
    lib.openelm_smallm_sgemm.restype = I
    return lib


def variants(lib) -> list[str]:
    return [name for name, bit in blas.KERNEL_VARIANTS.items() if lib.openelm_smallm_variants() & bit]


def product(lib, x, w, *, trans_a=False, alpha=1.0, beta=0.0, c=None, pad=(0, 0, 0), threads=1, variant="portable",
            ncols=None):
    """c = alpha * x @ w.T + beta * c through the kernel: x (m, k) stored as given (transposed: (k, m)), w (n, k);
    each array sits in a wider buffer (pad = extra columns of x, w, c) so that lda/ldb/ldc exceed the minimum.
    Returns (status, c as the kernel left it)."""
    m, k = x.shape
    n = w.shape[0]
    stored = np.ascontiguousarray(x.T if trans_a else x, dtype=np.float32)
    a = np.full((stored.shape[0], stored.shape[1] + pad[0]), np.nan, np.float32)
    a[:, : stored.shape[1]] = stored
    b = np.full((n, k + pad[1]), np.nan, np.float32)
    b[:, :k] = w
    out = np.full((m, n + pad[2]), np.nan, np.float32)
    if c is not None:
        out[:, :n] = c
    status = lib.openelm_smallm_sgemm(ROW_MAJOR, TRANS if trans_a else NO_TRANS, TRANS, m, n, k, alpha,
                                      a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], beta, out.ctypes.data,
                                      out.shape[1], threads, blas.KERNEL_VARIANTS[variant])
    assert np.isnan(out[:, n:]).all()  # nothing written beyond the n columns
    return status, out[:, :n]


def tolerance(x, w) -> np.ndarray:
    """float32 rounding of k-term dot products: a few ulps of the sum of |terms|."""
    return 1e-6 * x.shape[1] ** 0.5 * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T) + 1e-30


@pytest.mark.parametrize("m", range(1, 10))
@pytest.mark.parametrize("trans_a", [False, True])
def test_kernel_equals_a_float64_product(shim, m, trans_a):
    rng = np.random.default_rng(m)
    for variant in variants(shim):
        for n, k, pad in ((37, 67, (0, 0, 0)), (5, 3, (3, 5, 2)), (50, 1283, (1, 7, 3)), (8, 16, (0, 0, 0))):
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = rng.standard_normal((n, k)).astype(np.float32)
            status, c = product(shim, x, w, trans_a=trans_a, pad=pad, variant=variant)
            assert status == 0
            exact = x.astype(np.float64) @ w.astype(np.float64).T
            assert (np.abs(c - exact) <= tolerance(x, w)).all(), (variant, n, k, np.abs(c - exact).max())


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.0), (1.0, 1.0), (-2.0, 0.25), (1.0, -1.5)])
def test_alpha_beta_follow_blas_and_beta_zero_never_reads_c(shim, alpha, beta):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 45)).astype(np.float32)
    w = rng.standard_normal((29, 45)).astype(np.float32)
    c0 = rng.standard_normal((3, 29)).astype(np.float32)
    if beta == 0.0:
        c0[:] = np.nan  # BLAS: with beta == 0, c is output only; NaN there must not reach the result
    for variant in variants(shim):
        status, c = product(shim, x, w, alpha=alpha, beta=beta, c=c0, pad=(2, 1, 4), variant=variant)
        assert status == 0 and np.isfinite(c).all()
        exact = alpha * (x.astype(np.float64) @ w.astype(np.float64).T) + (beta * c0 if beta else 0.0)
        assert (np.abs(c - exact) <= abs(alpha) * tolerance(x, w) + 1e-6 * np.abs(exact)).all(), variant


def test_products_it_does_not_take_are_refused_and_left_alone(shim):
    x = np.ones((2, 8), np.float32)
    w = np.ones((4, 8), np.float32)
    c = np.full((2, 4), 5.0, np.float32)
    P = x.ctypes.data, w.ctypes.data, c.ctypes.data
    args = dict(order=ROW_MAJOR, ta=NO_TRANS, tb=TRANS, m=2, n=4, k=8, alpha=1.0, lda=8, ldb=8, ldc=4)

    def call(**change):
        a = {**args, **change}
        return shim.openelm_smallm_sgemm(a["order"], a["ta"], a["tb"], a["m"], a["n"], a["k"], a["alpha"], P[0],
                                         a["lda"], P[1], a["ldb"], 0.0, P[2], a["ldc"], 1, 0)

    for change in ({"order": 102}, {"tb": NO_TRANS}, {"m": 65}, {"m": 0}, {"k": 0}, {"alpha": 0.0}, {"lda": 7},
                   {"ldb": 7}, {"ldc": 3}):
        assert call(**change) == 1, change
    assert (c == 5.0).all()  # a refused call writes nothing (the shim then hands it to the BLAS)
    assert call() == 0 and (c == 8.0).all()
    if "avx2" not in variants(shim):
        assert shim.openelm_smallm_sgemm(ROW_MAJOR, NO_TRANS, TRANS, 2, 4, 8, 1.0, *P[:1], 8, P[1], 8, 0.0, P[2], 4,
                                         1, blas.KERNEL_VARIANTS["avx2"]) == 3


def test_threads_and_batch_rows_give_bit_identical_results(shim):
    # n * k large enough for many 64K-weight units, so several threads really share the work.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((9, 1000)).astype(np.float32)
    w = rng.standard_normal((301, 1000)).astype(np.float32)
    for variant in variants(shim):
        _, one = product(shim, x, w, variant=variant)
        for threads in (2, 3, 4):
            _, many = product(shim, x, w, threads=threads, variant=variant)
            assert np.array_equal(one, many), (variant, threads)
        for i in range(x.shape[0]):  # row i of the 9-row product == row i computed alone (and in a 2-row tile)
            _, alone = product(shim, x[i: i + 1], w, threads=2, variant=variant)
            _, pair = product(shim, x[i: i + 2], w, variant=variant)
            assert np.array_equal(alone[0], one[i]) and np.array_equal(pair[0], one[i]), (variant, i)
