"""The import graph of `src/skyreels_diffusers` keeps the layer rules of ARCHITECTURE.md.

The graph is read with `ast` from the source (nothing is imported), counting every import: module level, inside
functions, relative or absolute. A violation is printed as `importer -> imported (rule)`.
"""

import ast
from pathlib import Path


SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "skyreels_diffusers"

# Module (or package) -> layer. The longest matching prefix wins; a module matching none is an error, so a new
# top-level module has to be placed in a layer (and ARCHITECTURE.md) before it lands.
LAYERS = {
    PACKAGE: "package",  # the public `__init__`: re-exports the library layers
    f"{PACKAGE}._quiet": "package",
    f"{PACKAGE}.errors": "errors",  # the library's argument error, which every layer raises
    f"{PACKAGE}.schedulers": "schedulers",
    f"{PACKAGE}.loaders": "loaders",
    f"{PACKAGE}.kernels": "models",  # the models' own compute kernels (the 8-bit attention)
    f"{PACKAGE}.models": "models",
    f"{PACKAGE}.parallel": "parallel",
    f"{PACKAGE}.optimization": "optimization",
    f"{PACKAGE}.pipelines": "pipelines",
    # the application: the registry, the request, runs, the CLI, the web app, the converter
    f"{PACKAGE}.app": "app",
    f"{PACKAGE}.app.tasks": "app.tasks",
    f"{PACKAGE}.app.tiny": "app.tiny",
    f"{PACKAGE}.app.request": "app.request",
    f"{PACKAGE}.app.output": "app.run",
    f"{PACKAGE}.app.distributed": "app.run",
    f"{PACKAGE}.app.run": "app.run",
    f"{PACKAGE}.app.convert": "app.convert",
    f"{PACKAGE}.app.web": "app.web",
    f"{PACKAGE}.app.jobs": "app.serve",  # the job store and worker of the served API
    f"{PACKAGE}.app.api": "app.serve",  # the HTTP API (FastAPI)
    f"{PACKAGE}.app.serve": "app.serve",  # its Ray Serve deployments
    f"{PACKAGE}.app.cli": "app.cli",
}

LIBRARY = {"errors", "schedulers", "loaders", "models", "parallel", "optimization", "pipelines"}
# Layer -> the layers it may import (its own included). Everything else is a violation.
ALLOWED = {
    "errors": {"errors"},
    "schedulers": {"schedulers", "errors"},
    "loaders": {"loaders", "errors"},
    "models": {"models", "loaders", "errors"},
    "parallel": {"parallel", "models", "loaders", "errors"},
    "optimization": {"optimization", "models", "loaders", "errors"},
    "pipelines": {"pipelines", "models", "schedulers", "loaders", "errors"},
    "package": {"package", *LIBRARY},
    "app": {"app"},
    "app.tasks": {"app.tasks", *LIBRARY},
    "app.tiny": {"app.tiny", "app.tasks", *LIBRARY},
    "app.request": {"app.request", "app.tasks", "app.tiny", *LIBRARY},
    "app.run": {"app.run", "app.request", "app.tasks", "app.tiny", *LIBRARY},
    "app.convert": {"app.convert", "app.tasks", *LIBRARY},
    "app.web": {"app.web", "app.run", "app.request", "app.tasks", "app.tiny", *LIBRARY},
    "app.serve": {"app.serve", "app.web", "app.run", "app.request", "app.tasks", "app.tiny", *LIBRARY},
    "app.cli": {"app.cli", "app.serve", "app.web", "app.run", "app.request", "app.tasks", "app.tiny", *LIBRARY},
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports anywhere in its body. `from pkg import name` points at
    `pkg.name` when that is a module of the package, else at `pkg`."""
    files = {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}
    graph = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name.split(".")[0] == package}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != package:
                    continue
                for alias in node.names:
                    edges.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target)
        graph[module] = edges - {module}
    return graph


def layer(module: str) -> str:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS here and to ARCHITECTURE.md")
    return LAYERS[max(matches, key=len)]


def violations(graph: dict[str, set[str]]) -> set[str]:
    found = set()
    for importer, imported in graph.items():
        for target in imported:
            source_layer, target_layer = layer(importer), layer(target)
            if target_layer not in ALLOWED[source_layer]:
                found.add(f"{importer} -> {target} ({source_layer} may not import {target_layer})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph`: its strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    graph = import_graph(SRC, PACKAGE)
    unplaced = sorted(m for m in graph if not any(m == prefix or m.startswith(prefix + ".") for prefix in LAYERS))
    assert not unplaced, "modules in no layer (add them to LAYERS and ARCHITECTURE.md):\n" + "\n".join(unplaced)


def test_import_rules():
    new = violations(import_graph(SRC, PACKAGE))
    assert not new, "imports against ARCHITECTURE.md's rules:\n" + "\n".join(sorted(new))


def test_no_import_circle():
    """No module reaches itself through imports (before: models -> conversion -> models, for `from_single_file`)."""
    found = cycles(import_graph(SRC, PACKAGE))
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_library_never_imports_the_application():
    graph = import_graph(SRC, PACKAGE)
    library = {m for m in graph if layer(m) in LIBRARY}
    reaching_up = sorted(f"{m} -> {t}" for m in library for t in graph[m] if layer(t).startswith("app"))
    assert not reaching_up, "library modules importing the application:\n" + "\n".join(reaching_up)


def test_cycle_finder_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_every_kind_of_import(tmp_path):
    """The reader finds function-level, relative, parent-package and absolute imports, and the rules flag them."""
    package = tmp_path / PACKAGE
    for folder in ("models", "pipelines", "parallel"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from . import models\n")
    (package / "parallel" / "ranks.py").write_text("def rank():\n    return 0\n")
    (package / "models" / "model.py").write_text("def build():\n    from ..pipelines import tiny\n    return tiny\n")
    (package / "pipelines" / "tiny.py").write_text("")
    (package / "pipelines" / "pipe.py").write_text(
        "import os\nfrom .. import parallel\nfrom skyreels_diffusers.parallel.ranks import rank\n"
    )
    graph = import_graph(tmp_path, PACKAGE)
    assert graph[f"{PACKAGE}.models.model"] == {f"{PACKAGE}.pipelines.tiny"}
    assert graph[f"{PACKAGE}.pipelines.pipe"] == {f"{PACKAGE}.parallel", f"{PACKAGE}.parallel.ranks"}
    assert graph[PACKAGE] == {f"{PACKAGE}.models"}
    assert violations(graph) == {
        f"{PACKAGE}.models.model -> {PACKAGE}.pipelines.tiny (models may not import pipelines)",
        f"{PACKAGE}.pipelines.pipe -> {PACKAGE}.parallel (pipelines may not import parallel)",
        f"{PACKAGE}.pipelines.pipe -> {PACKAGE}.parallel.ranks (pipelines may not import parallel)",
    }


# ---------------------------------------------------------------------------------------------- one task registry
REGISTRY = SRC / PACKAGE / "app" / "tasks.py"
TASK_NAMES = {"reference_to_video", "single_shot_extension", "shot_switching_extension", "talking_avatar"}
VARIANT_NAMES = {"reference", "extension", "avatar"}
TASK_IDENTIFIERS = {"task", "task_type", "task_name", "variant"}


def _strings(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_strings(e) for e in node.elts))
    return set()


def _identifier(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def task_branches(source: str) -> list[str]:
    """Comparisons that branch on a task or variant: against one of their names (`x == "talking_avatar"`,
    `variant in ("reference", "extension")`), or of a value named task / variant against anything but None
    (`spec.variant == other`). Looking a name up in a table (`KEY_MAPS[variant]`) is not a branch."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        names = set().union(*(_strings(o) for o in operands)) & (TASK_NAMES | VARIANT_NAMES)
        none = any(isinstance(o, ast.Constant) and o.value is None for o in operands)
        equality = any(isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)) for op in node.ops)
        named = any(_identifier(o) in TASK_IDENTIFIERS for o in operands)
        if names or (named and equality and not none):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_task_or_variant_branch_outside_the_registry():
    """Every fact of a task lives in `app/tasks.py` (ARCHITECTURE.md rule 8): no module branches on a task's or a
    variant's name (before: the request, run, distributed, web, tiny, convert and loader modules did)."""
    found = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        if path != REGISTRY:
            found += [f"{path.relative_to(SRC)}:{line}" for line in task_branches(path.read_text())]
    assert not found, "task/variant branches outside app/tasks.py:\n" + "\n".join(found)


def test_task_branch_finder_sees_them():
    source = (
        "if request.task == 'talking_avatar':\n    pass\n"
        "x = 1 if spec.variant != 'reference' else 2\n"
        "ok = variant in ('extension', 'avatar')\n"
        "same = task == other.task\n"
        "fine = variant is None or KEY_MAPS[variant] == 'wan'\n"
    )
    assert sorted(line.split(":")[0] for line in task_branches(source)) == ["1", "3", "4", "5"]
