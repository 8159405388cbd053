"""The architecture, checked: layers import only downwards, no import cycles, no reaching into another package's
CLI or private names, and `pip install .` ships every package with its commands."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What each package may import of ours: tokenizer_tap < assistant < (app, eval) and eval < finetune, which scores
#: its checkpoints with eval's runner (one evaluation loop, one set of normalisers).
ALLOWED = {"tokenizer_tap": set(), "assistant": {"tokenizer_tap"}, "app": {"tokenizer_tap", "assistant"},
           "eval": {"tokenizer_tap", "assistant"}, "finetune": {"tokenizer_tap", "assistant", "eval"}}


def modules() -> dict[str, Path]:
    """Every module of the five packages by dotted name."""
    out = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, top_level_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every import of ours, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in ALLOWED]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] in ALLOWED:
                found.append((base, [a.name for a in node.names], node.lineno))
    return found


def test_layers_import_only_downwards() -> None:
    bad = []
    for name, path in modules().items():
        own = name.split(".")[0]
        for target, _, line in imports(name, path):
            other = target.split(".")[0]
            if other != own and other not in ALLOWED[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({own} may use {sorted(ALLOWED[own])})")
    assert not bad, "\n".join(bad)


def test_no_module_reaches_into_another_packages_cli_or_private_names() -> None:
    bad = []
    for name, path in modules().items():
        own = name.split(".")[0]
        for target, names, line in imports(name, path):
            if target.split(".")[0] == own:
                continue
            private = [n for n in names if n.startswith("_")]
            if target.split(".")[-1] == "cli" or private or any(p.startswith("_") for p in target.split(".")[1:]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} {names}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_at_module_level() -> None:
    """Module-level imports only: a function-level import runs after every module is loaded, so it cannot cycle."""
    every = modules()
    graph = {name: set() for name in every}
    for name, path in every.items():
        for target, names, _ in imports(name, path, top_level_only=True):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in every and candidate != name:
                    graph[name].add(candidate)
                    break
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_wheel_ships_every_package_and_its_commands(tmp_path: Path) -> None:
    import setuptools  # noqa: F401 - pinned in requirements-dev: the build backend pyproject.toml names
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and *.egg-info behind
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for package in ALLOWED:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    wheel, = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
        entry_points = next(z.read(n).decode() for n in z.namelist() if n.endswith("entry_points.txt"))
        assert "finetune/configs/tap_stage1.yaml" in z.namelist()
    assert set(ALLOWED) <= tops
    scripts = dict(line.split(" = ") for line in entry_points.splitlines() if " = " in line)
    assert {"tapchat", "tapchat-eval", "tapchat-finetune", "tap"} <= set(scripts)
    for target in scripts.values():  # each command resolves to a callable
        module, func = target.split(":")
        __import__(module)
        assert callable(getattr(sys.modules[module], func))
