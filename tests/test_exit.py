"""cli.exit_process, the end of every CLI process: the exit code, exit handlers and flushed output survive the
skipped teardown; a running non-daemon thread, or OPENELM_MLX_FAST_EXIT=off, gets the normal exit."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **env}, timeout=60)


PROGRAM = """
import atexit, sys, tempfile, weakref
from openelm_mlx import cli
atexit.register(lambda: print("handler ran", file=sys.stderr))
print("x" * 100000, end="")  # more than a pipe's buffer: still all there after the fast exit
class Kept: pass
kept = Kept()
weakref.finalize(kept, print, "finalizer ran", file=sys.stderr)
cli.exit_process(3)
"""


@pytest.mark.parametrize("switch", ["on", "off"])
def test_exit_code_output_and_handlers(switch):
    proc = run(PROGRAM, OPENELM_MLX_FAST_EXIT=switch)
    assert proc.returncode == 3
    assert proc.stdout == "x" * 100000
    assert "handler ran" in proc.stderr and "finalizer ran" in proc.stderr


def test_a_running_thread_is_waited_for():
    proc = run("""
import threading, time
from openelm_mlx import cli
def late():
    time.sleep(0.5)
    print("thread finished", flush=True)
threading.Thread(target=late).start()
cli.exit_process(0)
""")
    assert proc.returncode == 0 and proc.stdout == "thread finished\n"


def test_a_cli_ends_through_it():
    """A real CLI: its output is complete and its exit code kept (bad input: 1) with the fast exit."""
    ok = subprocess.run([sys.executable, "-m", "openelm_mlx.info"], capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert ok.returncode == 0 and "OPENELM_MLX_FAST_EXIT" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "openelm_mlx.train", "--iters", "0"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert bad.returncode != 0 and "--iters" in bad.stderr and "Traceback" not in bad.stderr
