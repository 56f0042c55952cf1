"""The package's shape (docs/ARCHITECTURE.md): stages import only the stages below them, no import cycles, no
module over 400 lines, no function over 8 parameters, commands only in ``cli/``, one error base class.

Read from the source with ``ast`` (nothing is imported), so a violation names the file and line."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "paraphrase_ray"
CORE = {"errors", "typecheck", "config", "files", "storage", "models", "text", "data"}
# Bottom to top; a module may import its own layer and the layers below. ``api`` is the flat public API on top
# of the stages that run without Ray's servers; ``sweep`` and ``serve`` are side by side (neither imports the other).
LAYERS = [CORE, {"prompt"}, {"training", "generation"}, {"evaluation"}, {"api"}, {"sweep", "serve"}, {"cli"}]


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, int]]:
    """Package modules ``path`` imports (at any depth: lazy imports count), with their line numbers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("paraphrase_ray"):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.append((full if full in MODULES else node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("paraphrase_ray")]
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    return -1  # the package's own __init__ (it exposes the API lazily)


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "paraphrase_ray" and _layer(m) < 0] == []


def test_stages_import_only_downwards():
    up = [
        f"{path.relative_to(PKG.parent)}:{line} imports {target}"
        for mod, path in MODULES.items()
        if mod != "paraphrase_ray"
        for target, line in _imports(path)
        if _layer(target) > _layer(mod)
    ]
    assert up == []


def test_no_import_cycles():
    graph = {m: {t for t, _ in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    # a package __init__ is imported with any of its modules; only module-to-module cycles count
    assert [c for c in cycles if not any(MODULES[x].name == "__init__.py" for x in c)] == []


def test_module_and_function_sizes():
    problems = []
    for path in MODULES.values():
        src = path.read_text()
        if src.count("\n") > 400:
            problems.append(f"{path.name}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                n = len([x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")])
                n += bool(a.vararg) + bool(a.kwarg)
                if n > 8:
                    problems.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}: {n} parameters")
                if node.name.startswith("cmd_") and path.parent.name != "cli":
                    problems.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} outside cli/")
    flat = [p.name for p in PKG.glob("*.py")]
    assert problems == [] and len(flat) <= 12, (problems, flat)


def test_every_project_error_derives_from_one_base():
    from paraphrase_ray import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) > 1 and all(issubclass(c, errors.ParaphraseRayError) for c in classes)
    # and no module defines an exception class of its own outside errors.py
    stray = [
        f"{p.relative_to(PKG.parent)}:{node.lineno} {node.name}"
        for p in MODULES.values() if p.name != "errors.py"
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_")  # private: never leaves its module
        and any(isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases)
    ]
    assert stray == []


def _third_party(path: Path, top: str) -> list[int]:
    """Lines of ``path`` that import the third-party package ``top`` (any depth: lazy imports count)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            lines += [node.lineno for a in node.names if a.name.split(".")[0] == top]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            lines += [node.lineno] if node.module.split(".")[0] == top else []
    return lines


# ARCHITECTURE: "Ray enters in evaluation/evaluator.py (the shared scoring actor) and the sweep/ and serve/ stages";
# the CLI on top of them drives both (the demo runs a sweep and Serve on one Ray of its own).
RAY_ALLOWED = ("paraphrase_ray.evaluation.evaluator", "paraphrase_ray.sweep", "paraphrase_ray.serve",
               "paraphrase_ray.cli")


def test_ray_is_imported_only_where_architecture_says():
    stray = [f"{p.relative_to(PKG.parent)}:{line}" for mod, p in MODULES.items()
             if not mod.startswith(RAY_ALLOWED) for line in _third_party(p, "ray")]
    assert stray == []
    # and the library below them never reaches those modules: everything under core .. api runs without Ray
    rayless = [m for m in MODULES if not m.startswith(RAY_ALLOWED)]
    reach = [f"{m} imports {t}" for m in rayless for t, _ in _imports(MODULES[m]) if t.startswith(RAY_ALLOWED)
             and not (m == "paraphrase_ray" and t == "paraphrase_ray.api")]
    assert reach == []


def test_no_module_outside_the_cli_imports_it():
    found = [f"{p.relative_to(PKG.parent)}:{line} imports {t}" for mod, p in MODULES.items()
             if not mod.startswith("paraphrase_ray.cli")
             for t, line in _imports(p) if t.startswith("paraphrase_ray.cli")]
    assert found == []
    assert _layer("paraphrase_ray.cli.main") == len(LAYERS) - 1  # and the layer rule puts it on top
