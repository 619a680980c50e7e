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
    f"{PACKAGE}.schedulers": "schedulers",
    f"{PACKAGE}.kernels": "models",  # the models' own compute kernels (the 8-bit attention)
    f"{PACKAGE}.models": "models",
    f"{PACKAGE}.parallel": "parallel",
    f"{PACKAGE}.optimization": "optimization",
    f"{PACKAGE}.pipelines": "pipelines",
    f"{PACKAGE}.conversion": "conversion",
    f"{PACKAGE}.loading": "request",  # strict loading of pipeline folders, for the request
    f"{PACKAGE}.generation": "request",
    f"{PACKAGE}.generation_parallel": "request",
    f"{PACKAGE}.cli": "cli",
    f"{PACKAGE}.app": "app",
}

# Layer -> the layers it may import (its own included). Everything else is a violation.
ALLOWED = {
    "schedulers": {"schedulers"},
    "models": {"models"},
    "parallel": {"parallel", "models"},
    "optimization": {"optimization", "models"},
    "pipelines": {"pipelines", "models", "schedulers"},
    "conversion": {"conversion", "models", "schedulers", "pipelines"},
    "package": {"package", "models", "schedulers", "pipelines", "parallel", "optimization", "conversion"},
    "request": {"request", "models", "schedulers", "pipelines", "parallel", "optimization", "conversion"},
    "app": {"app", "request", "models", "schedulers", "pipelines", "parallel", "optimization"},
    "cli": {"cli", "app", "request", "models", "schedulers", "pipelines", "parallel", "optimization"},
}

# The toy components are for `--model tiny`, tests and benchmarks: no library layer builds on them.
TINY = f"{PACKAGE}.pipelines.tiny"
TINY_IMPORTERS = {"request", "cli", "app"}

# The one declared exception: diffusers' `from_single_file` API lives on the model class, and its key conversion is
# the converter's (one source of truth), so the model reaches into conversion for that single method.
EXCEPTIONS = {f"{PACKAGE}.models.transformer_skyreels_v3 -> {PACKAGE}.conversion.single_file"}


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
            if f"{importer} -> {target}" in EXCEPTIONS:
                continue
            if target_layer not in ALLOWED[source_layer]:
                found.add(f"{importer} -> {target} ({source_layer} may not import {target_layer})")
            elif (target == TINY or target.startswith(TINY + ".")) and importer != TINY:
                if source_layer not in TINY_IMPORTERS:
                    found.add(f"{importer} -> {target} ({source_layer} may not import the toy components)")
    return found


def test_every_module_has_a_layer():
    graph = import_graph(SRC, PACKAGE)
    unplaced = sorted(m for m in graph if not any(m == prefix or m.startswith(prefix + ".") for prefix in LAYERS))
    assert not unplaced, "modules in no layer (add them to LAYERS and ARCHITECTURE.md):\n" + "\n".join(unplaced)


def test_import_rules():
    new = violations(import_graph(SRC, PACKAGE))
    assert not new, "imports against ARCHITECTURE.md's rules:\n" + "\n".join(sorted(new))


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
