"""The package layout holds (docs: README "Code map"): which part of ``unimur`` may import which,
no import circles, no private names across modules, no ``sys.path`` edits in the library, short
functions. Read from the source's AST, lazy imports (inside functions) included; nothing is imported.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY, DEMO = "unimur", "unimur_demo"
SEED_WRAPPERS = {"unimur.prune_model_ckpt", "unimur.extract_vis_emb"}  # the seed's script paths
MAX_FUNCTION_LINES = 60

# layer -> the layers it may import from (its own included). Top-level config, errors, ranking and
# utils/ are the core; commands/ may import anything in the library; only the seed wrappers import it.
CORE = {"core"}
ALLOWED = {
    "core": CORE,
    "model": CORE | {"model"},
    "data": CORE | {"model", "data"},
    "train": CORE | {"model", "data", "train"},
    "inference": CORE | {"model", "data", "inference"},
    "evaluation": CORE | {"model", "data", "inference", "evaluation"},
    "commands": CORE | {"model", "data", "train", "inference", "evaluation", "commands"},
    "seed_wrapper": {"core", "commands"},
    "api": CORE | {"model", "data", "inference"},   # unimur/__init__.py: the public names
}
OUTSIDE = ("unimur_demo", "evals", "main", "benchmarks", "tests")  # programs beside the library


def layer(module: str) -> str:
    parts = module.split(".")
    if module == LIBRARY:
        return "api"
    if module in SEED_WRAPPERS:
        return "seed_wrapper"
    if parts[1] in ("config", "errors", "ranking", "utils"):
        return "core"
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def sources(*packages: str) -> dict[str, Path]:
    return {module_name(p): p for pkg in packages for p in sorted((REPO / pkg).rglob("*.py"))}


@functools.lru_cache(maxsize=None)
def tree(path: Path) -> ast.Module:
    """Each file parsed once for all the checks."""
    return ast.parse(path.read_text(), str(path))


@dataclass(frozen=True)
class Import:
    source: str        # the importing module
    target: str        # the imported module
    names: tuple       # names taken from it (from X import a, b)
    line: int

    def where(self) -> str:
        return f"{self.source.replace('.', '/')}.py:{self.line}"


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """Every import in the file (top level, inside functions, under TYPE_CHECKING), resolved to a
    module: ``from unimur.model import pretrained`` is the module ``unimur.model.pretrained``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            found += [Import(module, a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:
                    found.append(Import(module, sub, (), node.lineno))
                else:
                    found.append(Import(module, base, (a.name,), node.lineno))
    return found


def ours(name: str) -> bool:
    return name.split(".")[0] in (LIBRARY, *OUTSIDE)


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Import]]:
    files = sources(LIBRARY, DEMO)
    known = set(files)
    return {m: [i for i in imports_of(m, p, known) if ours(i.target)] for m, p in files.items()}


def layer_violations(graph: dict[str, list[Import]]) -> list[str]:
    bad = []
    for module, imports in graph.items():
        if not module.startswith(LIBRARY + ".") and module != LIBRARY:  # the demo
            bad += [f"{imp.where()}: the demo imports {imp.target}; call the library's commands"
                    for imp in imports if imp.target.split(".")[0] in OUTSIDE[1:]]
            continue  # it may import anything in the library
        for imp in imports:
            target_top = imp.target.split(".")[0]
            if target_top != LIBRARY:
                bad.append(f"{imp.where()}: the library imports {imp.target} (a program beside it)")
            elif imp.target == LIBRARY and imp.names and module != LIBRARY:
                bad.append(f"{imp.where()}: imports {', '.join(imp.names)} from the public API "
                           f"`unimur`; import the defining module")
            elif imp.target != LIBRARY and layer(imp.target) not in ALLOWED[layer(module)]:
                bad.append(f"{imp.where()}: {layer(module)}/ may not import {layer(imp.target)}/ "
                           f"({imp.target})")
    return bad


def private_imports(graph: dict[str, list[Import]]) -> list[str]:
    return [f"{imp.where()}: imports private {name} from {imp.target}"
            for module, imports in graph.items() for imp in imports if imp.target != module
            for name in imp.names if name.startswith("_") and not name.startswith("__")]


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan). A package's __init__
    is not an edge to its modules unless it imports them."""
    edges = {m: sorted({i.target for i in imps if i.target in graph and i.target != m})
             for m, imps in graph.items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_each_layer_imports_only_what_the_layout_allows(graph):
    bad = layer_violations(graph)
    assert not bad, "imports that break the layout (README 'Code map'):\n" + "\n".join(bad)


def test_no_import_circles(graph):
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_names_cross_modules(graph):
    bad = private_imports(graph)
    assert not bad, "\n".join(bad)


def test_no_sys_path_edits_in_the_library():
    bad = []
    for module, path in sources(LIBRARY).items():
        if module in SEED_WRAPPERS:
            continue
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.Attribute) and node.attr == "path" and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, "sys.path used inside the library:\n" + "\n".join(bad)


def test_flags_are_parsed_only_in_commands():
    """All flag parsing lives in unimur/commands/ (one module per command)."""
    bad = []
    for module, path in sources(LIBRARY).items():
        if layer(module) in ("commands", "seed_wrapper"):
            continue
        for node in ast.walk(tree(path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if "argparse" in names:
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, "argparse outside unimur/commands/:\n" + "\n".join(bad)


def test_only_commands_print():
    """A command's output goes to stdout (print); library code logs (logging) instead."""
    bad = [f"{path.relative_to(REPO)}:{node.lineno}"
           for module, path in sources(LIBRARY).items() if layer(module) not in ("commands", "seed_wrapper")
           for node in ast.walk(tree(path))
           if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert not bad, "print() in library code (use logging):\n" + "\n".join(bad)


def test_functions_are_short():
    long = []
    for module, path in sources(LIBRARY, DEMO).items():
        for node in ast.walk(tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_rules_catch_what_they_guard():
    """The checks themselves: a forbidden import, a circle and a private import are reported."""
    graph = {
        "unimur.model.model": [Import("unimur.model.model", "unimur.train.loss", (), 3)],
        "unimur.train.loss": [Import("unimur.train.loss", "unimur.model.model", ("_helper",), 4)],
        "unimur.inference.session": [Import("unimur.inference.session", "unimur_demo.pipeline", (), 5)],
    }
    assert layer_violations(graph) == [
        "unimur/model/model.py:3: model/ may not import train/ (unimur.train.loss)",
        "unimur/inference/session.py:5: the library imports unimur_demo.pipeline (a program beside it)",
    ]
    assert cycles(graph) == [["unimur.model.model", "unimur.train.loss"]]
    assert private_imports(graph) == ["unimur/train/loss.py:4: imports private _helper from unimur.model.model"]


SEED_COMMANDS = ["main.py", "evals/eval_visdial.py", "evals/eval_mmdialog.py", "unimur/prune_model_ckpt.py",
                 "unimur/extract_vis_emb.py"]


@pytest.mark.parametrize("script", SEED_COMMANDS)
def test_the_seed_command_paths_run_as_written(script, tmp_path):
    """`python <script> --help` from the checkout and, by absolute path, from another folder (no
    PYTHONPATH): each is a thin wrapper over its `unimur.commands` module."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    for cwd, path in ((REPO, script), (tmp_path, str(REPO / script))):
        proc = subprocess.run([sys.executable, path, "--help"], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("usage:"), proc.stdout[:200]
