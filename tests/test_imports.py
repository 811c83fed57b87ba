"""Import rules: config and weight tables import neither torch nor mlx; the MLX side never imports torch; the
trainer never imports mlx; no import cycle; model.py knows nothing of the CPU layer; one home per switch; every
CLI on the one scaffold."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest


def modules_after_import(stmt: str) -> set:
    code = f"import sys; {stmt}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["openelm_mlx", "openelm_mlx.config", "openelm_mlx.weights"])
def test_pure_modules_import_neither_framework(module):
    loaded = modules_after_import(f"import {module}")
    assert "torch" not in loaded and "mlx" not in loaded


@pytest.mark.parametrize("module", ["openelm_mlx.model", "openelm_mlx.checkpoint", "openelm_mlx.tokenizer",
                                    "openelm_mlx.textfiles", "openelm_mlx.adapters", "openelm_mlx.tuner",
                                    "openelm_mlx.lora", "openelm_mlx.fuse", "openelm_mlx.generate",
                                    "openelm_mlx.perplexity", "openelm_mlx.convert", "openelm_mlx.engine",
                                    "openelm_mlx.server", "openelm_mlx.chat"])
def test_mlx_side_does_not_import_torch(module):
    loaded = modules_after_import(f"import {module}")
    assert "torch" not in loaded


@pytest.mark.parametrize("module", ["openelm_mlx.reference.prepare_data", "openelm_mlx.reference.stream"])
def test_data_preparation_and_streaming_do_not_import_mlx(module):
    assert "mlx" not in modules_after_import(f"import {module}")


# ------------------------------------------------------------------------------------------ architecture rules

PACKAGE = Path(__file__).resolve().parents[1] / "openelm_mlx"
CLIS = ["convert", "generate", "lora", "fuse", "train", "perplexity", "evaluate", "info", "demo", "prepare_data",
        "server", "chat"]


def package_imports() -> dict[str, set]:
    """module -> the openelm_mlx modules it imports (at any depth of the file: lazy imports count too)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                if target.startswith("openelm_mlx"):
                    deps.add(target)
                    deps.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("openelm_mlx"))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_the_import_graph_has_no_cycle():
    graph = package_imports()
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if d == "openelm_mlx" or d.startswith(m + "."):  # the package root's lazy API and a package's own parts
                continue
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_model_file_knows_nothing_of_the_cpu_layer():
    graph = package_imports()
    assert not {d for d in graph["openelm_mlx.model"] if d.startswith("openelm_mlx.cpu")}
    assert graph["openelm_mlx.model"] <= {"openelm_mlx.config", "openelm_mlx.mlx_lm_parts"}  # the latter: a leaf
    assert graph["openelm_mlx.mlx_lm_parts"] == set()


def test_importing_the_trainer_imports_no_mlx():
    loaded = modules_after_import("import openelm_mlx.reference.train")
    assert "torch" in loaded and not {m for m in loaded if m == "mlx" or m.startswith("mlx.")}


def code_of(path: Path) -> str:
    return "\n".join(line.split("  #")[0] for line in path.read_text().splitlines())


def test_each_switch_is_defined_in_exactly_one_module():
    from openelm_mlx import switches

    for name in switches.SWITCHES:
        homes = [p for p in PACKAGE.rglob("*.py")
                 if re.search(rf"Switch\(\"{name}\"|(os\.environ|getenv)[^\n]*{name}", code_of(p))]
        assert [p.name for p in homes] == ["switches.py"], (name, homes)
    for path in PACKAGE.rglob("*.py"):
        if path.name != "switches.py":
            assert not re.search(r"os\.environ(\.get)?\(?\[?[\"']OPENELM_MLX_", path.read_text()), path


@pytest.mark.parametrize("cli", CLIS + ["convert/mlx_to_hf", "convert/corenet_to_hf"])
def test_every_cli_uses_the_scaffold_and_accepts_a_settings_file(cli):
    if cli.startswith("convert/"):
        path = PACKAGE.parent / f"{cli}.py"
        code = f"import runpy, sys; sys.argv = ['x', '--help']; runpy.run_path({str(path)!r}, run_name='__main__')"
    else:
        wing = PACKAGE / "reference" / f"{cli}.py"  # the torch CLIs live there; openelm_mlx/{cli}.py is the entry
        path = wing if wing.exists() else PACKAGE / f"{cli}.py"
        code = f"import sys; sys.argv = ['x', '--help']; import runpy; runpy.run_module('openelm_mlx.{cli}', " \
               "run_name='__main__')"
    text = path.read_text()
    assert "cli.run(" in text or "run_bridge(" in text, f"{cli}: main does not go through cli.run"
    assert "SystemExit" not in text.replace("except SystemExit", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "-c CONFIG, --config CONFIG" in out.stdout, out.stderr[-2000:]


def test_library_code_raises_no_system_exit():
    for path in PACKAGE.rglob("*.py"):
        assert "raise SystemExit" not in path.read_text() and "sys.exit(f" not in path.read_text(), path
