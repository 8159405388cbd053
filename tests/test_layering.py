"""The architecture, checked: layers import only downwards, no import cycles, no reaching into another package's
CLI or private names, and `pip install .` ships every package with its commands."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest

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


class Import(NamedTuple):
    """One import statement of ours: the module it names (relative ones resolved), the names it takes from it, its
    line, and whether it ever runs (`if TYPE_CHECKING:` imports do not)."""

    module: str
    names: list[str]
    line: int
    runs: bool


def imports(name: str, path: Path) -> list[Import]:
    """Every import of ours in the module, at any depth: top level, inside functions and methods, under `if`."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and is_type_checking(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        runs = id(node) not in typing_only
        if isinstance(node, ast.Import):
            found += [Import(a.name, [], node.lineno, runs) for a in node.names if a.name.split(".")[0] in ALLOWED]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] in ALLOWED:
                found.append(Import(base, [a.name for a in node.names], node.lineno, runs))
    return sorted(found, key=lambda i: i.line)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, dict[str, str]]:
    """module -> {module it imports when it runs: where ("path:line")}. `from a import b, c` imports `a` and, where
    they are modules, `a.b` and `a.c`; function-level imports count (they run, only later)."""
    every = modules()
    graph: dict[str, dict[str, str]] = {name: {} for name in every}
    for name, path in every.items():
        for imp in imports(name, path):
            if not imp.runs:
                continue
            for target in [imp.module] + [f"{imp.module}.{n}" for n in imp.names]:
                if target in every and target != name:
                    graph[name].setdefault(target, f"{path.relative_to(ROOT)}:{imp.line}")
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """The first cycle a depth-first search meets, as its nodes with the first one repeated at the end."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    return "\n".join(f"  {a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_layers_import_only_downwards() -> None:
    bad = []
    for name, path in modules().items():
        own = name.split(".")[0]
        for target, _, line, _ in imports(name, path):  # `if TYPE_CHECKING:` too: a type is a dependency
            other = target.split(".")[0]
            if other != own and other not in ALLOWED[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({own} may use {sorted(ALLOWED[own])})")
    assert not bad, "\n".join(bad)


def test_no_module_reaches_into_another_packages_cli_or_private_names() -> None:
    bad = []
    for name, path in modules().items():
        own = name.split(".")[0]
        for target, names, line, _ in imports(name, path):
            if target.split(".")[0] == own:
                continue
            private = [n for n in names if n.startswith("_")]
            if target.split(".")[-1] == "cli" or private or any(p.startswith("_") for p in target.split(".")[1:]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} {names}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    """Imports at any depth, between modules and between packages. A function-level import cannot fail at load time,
    but a cycle through one still means two modules that need each other: the shared part belongs lower down."""
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + describe(cycle, graph)
    packages: dict[str, dict[str, str]] = {package: {} for package in ALLOWED}
    for name, targets in graph.items():
        for target, where in targets.items():
            if target.split(".")[0] != name.split(".")[0]:
                packages[name.split(".")[0]].setdefault(target.split(".")[0], where)
    cycle = find_cycle(packages)
    assert cycle is None, "package import cycle:\n" + describe(cycle, packages)


#: Scoring an answers file, as a fresh process does it: every benchmark module loaded (the registry), an answers file
#: read, scored and turned into a submission, a resumed file's ids read and shards merged.
SCORING = """
import json, sys
from pathlib import Path
from eval import answers, benchmarks, scoring, vqa  # benchmarks: every benchmark module
folder = Path(sys.argv[1])
(folder / "a.jsonl").write_text("".join(json.dumps({"question_id": i, "text": t}) + "\\n"
                                        for i, t in ((1, "yes"), (2, "Two"))))
annotations = {"1": {"answers": ["yes"] * 10, "answer_type": "yes/no"}, "2": {"answers": ["2"] * 10,
                                                                            "answer_type": "number"}}
report = scoring.score("vqav2", scoring.read_answers(folder / "a.jsonl"), annotations)
vqa.submission(folder / "a.jsonl", folder / "submission.json")
answers.merge([folder / "a.jsonl", folder / "a.jsonl"], folder / "merged.jsonl")
print(json.dumps({"accuracy": report["accuracy"], "ids": sorted(answers.answered_ids(folder / "merged.jsonl")),
                  "submission": json.loads((folder / "submission.json").read_text()),
                  "loaded": [m for m in ("torch", "transformers", "assistant.engine", "eval.runner")
                             if m in sys.modules]}))
"""


def test_scoring_an_answers_file_never_loads_torch(tmp_path: Path) -> None:
    """Reading and scoring answers is file work: it must not pay for torch, transformers or the engine (the runner,
    which writes answers, does). A fresh process, since this one has torch loaded already."""
    done = subprocess.run([sys.executable, "-c", SCORING, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"accuracy": 1.0, "ids": ["1", "2"], "loaded": [],
                      "submission": [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"}]}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel .` of the checkout: the five packages, the demo bundle, the commands."""
    import setuptools  # noqa: F401 - pinned in requirements-dev: the build backend pyproject.toml names
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in the checkout would leave build/ and *.egg-info behind
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for folder in (*ALLOWED, "models/demo"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp)], capture_output=True, text=True, timeout=300, cwd=tmp)
    assert done.returncode == 0, done.stderr
    found, = tmp.glob("*.whl")
    return found


def test_the_wheel_ships_every_package_and_its_commands(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "finetune/configs/tap_stage1.yaml" in names
    assert {n.split("/")[0] for n in names} >= set(ALLOWED)
    # pyproject.toml lists its packages (one is mapped onto models/demo): a new one must be listed too
    packages = {str(p.relative_to(ROOT)) for package in ALLOWED for p in (ROOT / package).rglob("__init__.py")}
    assert packages <= set(names), f"not in pyproject.toml's packages: {sorted(packages - set(names))}"
    scripts = dict(line.split(" = ") for line in entry_points.splitlines() if " = " in line)
    assert {"tapchat", "tapchat-eval", "tapchat-finetune", "tap"} <= set(scripts)
    for target in scripts.values():  # each command resolves to a callable
        module, func = target.split(":")
        __import__(module)
        assert callable(getattr(sys.modules[module], func))


#: Where an installed copy looks for the demo bundle when nothing names another one.
FIND_BUNDLE = """
import json, tokenizer_tap
from tokenizer_tap.hub import demo_models, require_demo_models
print(json.dumps({"package": tokenizer_tap.__file__, "found": str(demo_models()),
                  "folder": str(require_demo_models())}))
"""


def test_the_wheel_carries_the_demo_bundle_and_an_install_finds_it(wheel: Path, tmp_path: Path) -> None:
    """`pip install .` (not editable) runs the demo models too: the bundle is package data, found from any folder."""
    bundle = ROOT / "models" / "demo"
    shipped = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert {"tap/config.json", "chat/config.json", "metrics.json", "README.md"} <= shipped
    assert any(name.startswith("gallery/") for name in shipped)
    with zipfile.ZipFile(wheel) as z:
        packed = {n.removeprefix("tokenizer_tap/demo_models/") for n in z.namelist()
                  if n.startswith("tokenizer_tap/demo_models/")}
    assert packed == shipped
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in os.environ.items() if k != "TAPCHAT_DEMO_MODELS"}  # conftest hides the bundle
    done = subprocess.run([sys.executable, "-c", FIND_BUNDLE], capture_output=True, text=True, timeout=120,
                          cwd=elsewhere, env={**env, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert Path(result["package"]).is_relative_to(target)  # the installed copy, not the checkout
    installed = target / "tokenizer_tap" / "demo_models"
    assert result["found"] == result["folder"] == str(installed)
    assert (installed / "tap" / "config.json").is_file() and (installed / "chat" / "config.json").is_file()
