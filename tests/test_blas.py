"""The optimized-BLAS preload (openelm_mlx.cpu.blas): detection order, the off switch, fallbacks, and that logits do
not change beyond float32 rounding. Each case runs in a fresh interpreter: the BLAS is fixed when mlx loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from openelm_mlx.cpu import blas

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload only acts on Linux")


def system_openblas() -> str:
    path = next((p for p, source in blas.candidates() if "openblas" in p.lower()), None)
    if path is None:
        pytest.skip("no system OpenBLAS (apt-get install libopenblas0-pthread) to test the optimized path with")
    return path


def run(code: str, setting: str | None, *args, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (blas.ENV_VAR, blas.GEMV_ENV_VAR)}
    if setting is not None:
        env[blas.ENV_VAR] = setting
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


STATUS = """
import json, sys, warnings
warnings.simplefilter("always")
import openelm_mlx
from openelm_mlx.cpu import blas
s = blas.status()
print(json.dumps({"loaded": s.loaded, "path": s.path, "kind": s.kind, "source": s.source, "reason": s.reason,
                  "too_late": s.too_late, "mlx": "mlx" in sys.modules, "line": blas.describe(),
                  "gemv_shim": s.gemv_shim, "gemv_reason": s.gemv_reason}))
"""


def status_in_subprocess(setting: str | None, **env_extra) -> tuple[dict, str]:
    proc = run(STATUS, setting, env_extra=env_extra)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@linux_only
def test_off_switch_loads_nothing():
    status, stderr = status_in_subprocess("none")
    assert not status["loaded"] and status["path"] is None and "OPENELM_MLX_BLAS=none" in status["reason"]
    assert "reference BLAS" in status["line"] and not status["mlx"] and "Warning" not in stderr


@linux_only
def test_system_openblas_is_found_and_loaded_without_importing_mlx():
    path = system_openblas()
    status, stderr = status_in_subprocess(None)
    assert status["loaded"] and status["kind"] == "openblas" and status["source"] == "system"
    assert os.path.realpath(status["path"]) == os.path.realpath(path)
    assert "OpenBLAS" in status["line"] and not status["mlx"] and "Warning" not in stderr


@linux_only
def test_explicit_path_comes_first(tmp_path):
    # A symlink under another name proves the library came from OPENELM_MLX_BLAS, not from detection.
    link = tmp_path / "libmyblas.so"
    link.symlink_to(system_openblas())
    status, _ = status_in_subprocess(str(link))
    assert status["loaded"] and status["path"] == str(link) and status["source"] == "OPENELM_MLX_BLAS"


@linux_only
@pytest.mark.parametrize("kind", ["missing", "not a library", "no cblas symbols"])
def test_bad_explicit_path_warns_and_falls_back(tmp_path, kind):
    if kind == "missing":
        bad, expected = tmp_path / "libnope.so", "does not exist"
    elif kind == "not a library":
        bad, expected = tmp_path / "libbroken.so", "could not be loaded"
        bad.write_bytes(b"not an ELF file")
    else:
        import ctypes.util

        libm = ctypes.util.find_library("m")
        if libm is None:
            pytest.skip("no libm to stand in for a library without cblas symbols")
        bad, expected = libm, "does not export cblas_sgemm"
    status, stderr = status_in_subprocess(str(bad))
    assert "BlasPreloadWarning" in stderr and str(bad) in stderr and expected in stderr
    assert "falling back to automatic detection" in stderr
    auto, _ = status_in_subprocess(None)
    assert status["loaded"] == auto["loaded"] and status["path"] == auto["path"]  # the fallback is detection
    assert status["source"] != "OPENELM_MLX_BLAS"


@linux_only
def test_importing_mlx_first_is_recorded_as_too_late():
    system_openblas()
    proc = run("import mlx.core\n" + STATUS, None)
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert status["too_late"] and not status["loaded"] and "imported before openelm_mlx" in status["reason"]
    assert "BlasPreloadWarning" in proc.stderr and "import openelm_mlx first" in proc.stderr


def test_detection_order(monkeypatch, tmp_path):
    # Known install locations first, then the ldconfig cache, then the mkl wheel, then a system libmkl_rt;
    # a library reachable by two names is tried once.
    files = {name: tmp_path / name for name in ("libopenblas.so.0", "ld_openblas.so", "libmkl_rt.so.2", "sys_mkl.so")}
    for path in files.values():
        path.touch()
    alias = tmp_path / "alias.so.0"
    alias.symlink_to(files["libopenblas.so.0"])
    known = [str(tmp_path / "absent.so"), str(files["libopenblas.so.0"])]
    monkeypatch.setattr(blas, "_known_openblas_paths", lambda: known)
    monkeypatch.setattr(blas, "_ldconfig_paths", lambda prefix: {
        "libopenblas": [str(alias), str(files["ld_openblas.so"])], "libmkl_rt": [str(files["sys_mkl.so"])]}[prefix])
    monkeypatch.setattr(blas, "_mkl_wheel_paths", lambda: [str(files["libmkl_rt.so.2"])])
    assert list(blas.candidates()) == [
        (str(files["libopenblas.so.0"]), "system"), (str(files["ld_openblas.so"]), "system"),
        (str(files["libmkl_rt.so.2"]), "mkl wheel"), (str(files["sys_mkl.so"]), "system")]


@linux_only
def test_ldconfig_parsing_finds_the_system_openblas():
    path = system_openblas()
    found = [os.path.realpath(p) for p in blas._ldconfig_paths("libopenblas")]
    if not found:
        pytest.skip("ldconfig is not available or its cache lists no OpenBLAS")
    assert os.path.realpath(path) in found


@linux_only
@pytest.mark.parametrize("setting", ["none", None])
def test_preferred_cpu_dtype_follows_the_blas_in_use(setting):
    if setting is None:
        system_openblas()
    proc = run("import openelm_mlx.cpu.dtype as d; print(d.preferred())", setting)
    expected = "bfloat16" if setting == "none" else "float32"
    assert proc.stdout.split() == [expected]


def test_prepare_rejects_unknown_tasks():
    from openelm_mlx import cpu
    from openelm_mlx.config import get_preset
    from openelm_mlx.model import Model

    with pytest.raises(ValueError, match="unknown task 'training'"):
        cpu.prepare(Model(get_preset("tiny")), "training")


LOGITS = """
import sys
import openelm_mlx
import mlx.core as mx
from openelm_mlx.cpu import blas
from openelm_mlx.config import get_preset
from openelm_mlx.model import Model
mx.set_default_device(mx.cpu)
model = Model(get_preset("tiny"))
model.load_weights(sys.argv[1])
tokens = mx.load(sys.argv[2])["tokens"]
mx.save_safetensors(sys.argv[3], {"logits": model(tokens)})
shim = blas.status().gemv_shim
import ctypes
print(ctypes.CDLL(shim).openelm_gemv_shim_forwarded(1) if shim else 0, blas.status().kind)
"""


def mkl_wheel() -> str:
    paths = blas._mkl_wheel_paths()
    if not paths:
        pytest.skip("the mkl wheel is not installed (pip install mkl)")
    return paths[0]


@linux_only
@pytest.mark.parametrize("library,batch,length", [("openblas", 2, 24), ("openblas", 1, 1), ("openblas", 5, 1),
                                                  ("mkl", 2, 24)])
def test_logits_agree_with_and_without_the_optimized_blas(tmp_path, library, batch, length):
    # OpenBLAS as detected by default; MKL named explicitly, since a system OpenBLAS comes first. One token per
    # sequence (decode's shape) sends every projection through the shim's small-M kernel in front of OpenBLAS.
    if library == "mkl":
        setting = mkl_wheel()
    else:
        system_openblas()
        setting = None
    import mlx.core as mx

    from openelm_mlx.config import get_preset
    from openelm_mlx.model import Model

    mx.random.seed(3)
    Model(get_preset("tiny")).save_weights(str(tmp_path / "w.safetensors"))
    tokens = mx.random.randint(3, 1000, (batch, length))
    mx.save_safetensors(str(tmp_path / "t.safetensors"), {"tokens": tokens})
    logits = {}
    for name, value, kind in (("reference", "none", "reference"), ("fast", setting, library)):
        out = tmp_path / f"logits-{name}.safetensors"
        proc = run(LOGITS, value, tmp_path / "w.safetensors", tmp_path / "t.safetensors", out,
                   env_extra={blas.CACHE_ENV_VAR: str(tmp_path / "cache")})
        forwarded, used = proc.stdout.split()[-2:]
        assert used == kind  # the BLAS that computed these logits
        if name == "fast" and library == "openblas":
            # One token per sequence: every linear layer (4 per block, and the head) is a few-row sgemm that the
            # shim's kernel computes; 48 rows are beyond it, 24 queries' attention scores are not.
            linear_layers = 4 * get_preset("tiny").num_transformer_layers + 1
            assert int(forwarded) >= (linear_layers if length == 1 else 1), forwarded
        logits[name] = mx.load(str(out))["logits"]
    ref, fast = logits["reference"], logits["fast"]
    assert ref.shape == fast.shape == (batch, length, get_preset("tiny").vocab_size)
    assert mx.abs(ref).max().item() > 1.0  # not a degenerate model
    assert mx.allclose(ref, fast, rtol=1e-5, atol=1e-4).item(), mx.abs(ref - fast).max().item()


@pytest.mark.parametrize("setting", ["none", None])
def test_info_reports_the_blas_in_use(setting):
    proc = run("from openelm_mlx.info import main; main(['--size', '64', '--dtypes', 'float32'])", setting)
    lines = proc.stdout.splitlines()
    blas_line = next(line for line in lines if line.startswith("BLAS: "))
    if setting == "none" and sys.platform.startswith("linux"):
        assert "reference BLAS" in blas_line and "OPENELM_MLX_BLAS=none" in blas_line
    gflops = float(next(line for line in lines if line.startswith("matmul 64x64 float32")).split()[-2])
    assert gflops > 0
    assert any(line.startswith("mlx: ") for line in lines)
    assert any(line.startswith("quantized decode: ") for line in lines)


def test_mkl_wheel_is_found_through_its_metadata(monkeypatch, tmp_path):
    # The mkl wheel installs libmkl_rt into <prefix>/lib, outside site-packages; RECORD lists it as ../../lib/...
    site = tmp_path / "lib" / "python3" / "site-packages"
    info = site / "mkl-2099.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mkl\nVersion: 2099.0.0\n")
    (info / "RECORD").write_text("../../../lib/libmkl_rt.so.2,,\n../../../lib/libmkl_core.so.2,,\n"
                                 "mkl-2099.0.0.dist-info/METADATA,,\n")
    monkeypatch.syspath_prepend(str(site))
    assert blas._mkl_wheel_paths() == [str(tmp_path / "lib" / "libmkl_rt.so.2")]


GEMV_FORMS = """
import ctypes, json
import numpy as np
import openelm_mlx
import mlx.core as mx
from openelm_mlx.cpu import blas
mx.random.seed(0)
x, xcol, x5 = mx.random.normal((1, 96)), mx.random.normal((96, 1)), mx.random.normal((5, 96))
w, wt, c = mx.random.normal((80, 96)), mx.random.normal((96, 80)), mx.random.normal((1, 80))
q, k = mx.random.normal((2, 3, 4, 16)), mx.random.normal((2, 3, 9, 16))
x40 = mx.random.normal((40, 96))
forms = {  # few-row sgemms: transposed or not on either side, beta != 0, batched; and one with 40 rows
    "x @ w.T": (lambda: x @ w.T, lambda n: n["x"] @ n["w"].T),
    "x @ wt": (lambda: x @ wt, lambda n: n["x"] @ n["wt"]),
    "xcol.T @ w.T": (lambda: xcol.T @ w.T, lambda n: n["xcol"].T @ n["w"].T),
    "addmm": (lambda: mx.addmm(c, x, w.T, alpha=0.5, beta=2.0), lambda n: 2.0 * n["c"] + 0.5 * n["x"] @ n["w"].T),
    "attention": (lambda: q @ k.swapaxes(-1, -2), lambda n: n["q"] @ n["k"].swapaxes(-1, -2)),
    "M=5": (lambda: x5 @ w.T, lambda n: n["x5"] @ n["w"].T),
    "M=5 @ wt": (lambda: x5 @ wt, lambda n: n["x5"] @ n["wt"]),
    "M=40": (lambda: x40 @ w.T, lambda n: n["x40"] @ n["w"].T),
}
arrays = {"x": x, "xcol": xcol, "x5": x5, "x40": x40, "w": w, "wt": wt, "c": c, "q": q, "k": k}
numpy = {name: np.array(a, dtype=np.float64) for name, a in arrays.items()}
shim = ctypes.CDLL(blas.status().gemv_shim)
report = {"kernel": blas.status().gemv_kernel}
for name, (ours, expected) in forms.items():
    before = [shim.openelm_gemv_shim_forwarded(which) for which in (0, 1)]
    out = ours()
    mx.eval(out)
    report[name] = {"err": float(np.abs(np.array(out, dtype=np.float64) - expected(numpy)).max()),
                    "sgemv": shim.openelm_gemv_shim_forwarded(0) - before[0],
                    "kernel": shim.openelm_gemv_shim_forwarded(1) - before[1]}
print(json.dumps(report))
"""
# Where each form goes, by OPENELM_MLX_GEMV: "kernel" (the shim's small-M kernel), "sgemv" or "sgemm" (OpenBLAS).
GEMV_ROUTES = {
    "on": {"x @ w.T": "kernel", "x @ wt": "sgemv", "xcol.T @ w.T": "kernel", "addmm": "kernel", "attention": "kernel",
           "M=5": "kernel", "M=5 @ wt": "sgemm", "M=40": "sgemm"},
    "portable": {"x @ w.T": "sgemv", "x @ wt": "sgemv", "xcol.T @ w.T": "sgemv", "addmm": "sgemv",
                 "attention": "kernel", "M=5": "sgemm", "M=5 @ wt": "sgemm", "M=40": "sgemm"},
    "sgemv": {"x @ w.T": "sgemv", "x @ wt": "sgemv", "xcol.T @ w.T": "sgemv", "addmm": "sgemv", "attention": "sgemm",
              "M=5": "sgemm", "M=5 @ wt": "sgemm", "M=40": "sgemm"},
}


@linux_only
@pytest.mark.parametrize("setting", list(GEMV_ROUTES))
def test_gemv_shim_computes_every_few_row_form_exactly_and_routes_it_by_the_switch(tmp_path, setting):
    system_openblas()
    proc = run(GEMV_FORMS, None, env_extra={blas.CACHE_ENV_VAR: str(tmp_path), blas.GEMV_ENV_VAR: setting})
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    kernel = report.pop("kernel")
    if setting == "sgemv":
        assert kernel == ""
    else:
        assert kernel.startswith("avx2 kernel" if setting == "on" else "portable kernel"), kernel
        if setting == "on" and not kernel.startswith("avx2"):
            pytest.skip("this CPU has no AVX2/FMA: the default is the portable kernel")
    for name, result in report.items():
        assert result["err"] < 1e-4, (name, result)  # float32 rounding of a 96-term dot product
        route = GEMV_ROUTES[setting][name]
        assert (result["kernel"] > 0, result["sgemv"] > 0) == (route == "kernel", route == "sgemv"), (name, result)


SPLIT_FORMS = """
import json, ctypes
import openelm_mlx
import mlx.core as mx
import numpy as np
from openelm_mlx.cpu import blas
mx.random.seed(0)
x, w, wt = mx.random.normal((300, 96)), mx.random.normal((700, 96)), mx.random.normal((96, 700))
shim = ctypes.CDLL(blas.status().gemv_shim)
report = {"line": blas.describe()}
for name, f, want in (("x @ w.T", lambda: x @ w.T, lambda: np.array(x, np.float64) @ np.array(w, np.float64).T),
                      ("x @ wt", lambda: x @ wt, lambda: np.array(x, np.float64) @ np.array(wt, np.float64))):
    before = shim.openelm_gemv_shim_forwarded(2)
    out = f()
    mx.eval(out)
    report[name] = {"err": float(np.abs(np.array(out, np.float64) - want()).max()),
                    "split": shim.openelm_gemv_shim_forwarded(2) - before}
print(json.dumps(report))
"""


@linux_only
@pytest.mark.parametrize("threads,switch,split", [("2", "1", True), ("1", "1", False), ("2", "0", False)])
def test_large_products_split_over_our_threads(tmp_path, threads, switch, split):
    """With OPENBLAS_NUM_THREADS > 1 large products run OpenBLAS single-threaded on blocks of output columns over
    the shim's pool (both layouts of b), equal to the float64 product; one thread, or the switch off: OpenBLAS."""
    system_openblas()
    proc = run(SPLIT_FORMS, None, env_extra={blas.CACHE_ENV_VAR: str(tmp_path), "OPENBLAS_NUM_THREADS": threads,
                                             blas.SPLIT_ENV_VAR: switch})
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ("large products split over 2 threads" in report.pop("line")) == split
    for name, result in report.items():
        assert result["err"] < 1e-3, (name, result)  # float32 rounding of 96-term dot products
        assert (result["split"] > 0) == split, (name, result)


@linux_only
def test_gemv_shim_off_switch_and_missing_compiler_keep_openblas(tmp_path):
    system_openblas()
    status, _ = status_in_subprocess(None, **{blas.CACHE_ENV_VAR: str(tmp_path / "a")})
    assert status["kind"] == "openblas" and status["gemv_shim"].startswith(str(tmp_path / "a"))
    assert "few-row matmuls on csrc/gemv_shim.c's" in status["line"] and "via cblas_sgemv" in status["line"]
    status, _ = status_in_subprocess(None, **{blas.GEMV_ENV_VAR: "sgemv", blas.CACHE_ENV_VAR: str(tmp_path / "a")})
    assert status["gemv_shim"] and "decode's M=1 matmuls via cblas_sgemv" in status["line"]
    status, _ = status_in_subprocess(None, **{blas.GEMV_ENV_VAR: "0", blas.CACHE_ENV_VAR: str(tmp_path / "b")})
    assert status["loaded"] and status["gemv_shim"] is None
    assert "turned off by OPENELM_MLX_GEMV" in status["gemv_reason"]
    assert not (tmp_path / "b").exists()  # nothing built when turned off
    status, stderr = status_in_subprocess(None, CC=str(tmp_path / "no-such-cc"),
                                          **{blas.CACHE_ENV_VAR: str(tmp_path / "c")})
    assert status["loaded"] and status["kind"] == "openblas" and status["gemv_shim"] is None
    assert "no-such-cc" in status["gemv_reason"] and "few-row matmuls on sgemm" in status["line"]
    assert "Traceback" not in stderr


def test_gemv_shim_build_is_cached_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    if not any(map(shutil.which, ("cc", "gcc", "clang"))):
        pytest.skip("no C compiler")
    from openelm_mlx import switches

    with switches.override(CACHE=str(tmp_path)):
        path, problem = blas.build_gemv_shim()
        assert path and not problem and Path(path).parent == tmp_path
        mtime = os.stat(path).st_mtime_ns
        assert blas.build_gemv_shim() == (path, "") and os.stat(path).st_mtime_ns == mtime  # built once
    assert [p.name for p in tmp_path.iterdir()] == [Path(path).name]


FAULTS_CODE = """
import json, resource, sys
import numpy as np
from openelm_mlx.cpu import memory

kept = memory.keep_freed_buffers()
faults = []
for _ in range(4):  # a prompt's products: large outputs made, filled and dropped, again and again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(48 << 20, np.uint8)
    a[::4096] = 1
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
import mlx.core as mx

a = mx.random.normal((2 << 20,))  # 8 MB
mx.eval(a)
del a  # MLX's own cache keeps freed buffers unless the heap is the cache
print(json.dumps({"kept": kept, "faults": faults, "mlx_cache": mx.get_cache_memory()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize("keep", [True, False])
def test_freed_buffers_are_reused_without_page_faults(keep):
    """With cpu.memory.keep_freed_buffers a 48 MB buffer (above glibc's 32 MB dynamic mmap limit) freed and made again
    reuses its pages, and MLX's freed buffers go to that heap; without it (OPENELM_MLX_KEEP_FREED=0) every
    allocation is mapped and faulted in afresh, and MLX caches its own."""
    out = run(FAULTS_CODE, None, env_extra={"OPENELM_MLX_KEEP_FREED": "1" if keep else "0"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kept"] is keep
    first, *again = result["faults"]  # (numpy asks for huge pages: a fault may map 2 MB)
    assert first > 0  # the first buffer is faulted in either way
    if keep:
        assert max(again) <= 2  # its pages reused
        assert result["mlx_cache"] == 0  # one cache, glibc's heap
    else:
        assert min(again) > 0  # mapped and zeroed afresh each time
        assert result["mlx_cache"] >= 8 << 20
