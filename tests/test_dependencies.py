"""pyproject.toml is the single dependency list, and it matches the code.

- every third-party module that `src/` imports (at the top, inside a function, or through `importlib` /
  `pytest.importorskip` with a literal name) belongs to a distribution declared as a core dependency or in an extra;
- every third-party module that `tests/` imports is installed by `pip install .[dev]` (core + the `dev` extra, with
  the extras it names);
- every core dependency is imported by `src/`, and every extra's entry by `src/` or `tests/`, except the few listed
  below with the reason they are needed without an import;
- constraints.txt pins only declared distributions (torch to the 2.13.0 CPU wheel), and the pre-commit hooks pin the
  same ruff as the `dev` extra.
"""

import ast
import re
import sys
from pathlib import Path

import pytest


tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE = "skyreels_diffusers"

# Top-level module -> distribution, where the two names differ beyond `-`/`_`/case.
MODULE_TO_DIST = {
    "PIL": "pillow",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
    "gradio_client": "gradio",  # gradio's own client, installed and versioned with it
}

# Imported without being declared: optional kernels only probed for, never required.
UNDECLARED_OK = {
    "flash_attn": "parallel/xfuser.py checks it is importable; xfuser itself requires it on GPU machines",
}

# Declared without being imported by name.
NOT_IMPORTED_OK = {
    "accelerate": "diffusers needs it for enable_model_cpu_offload / sequential offload and low-memory loading",
    "ruff": "the lint step's command-line tool (scripts/lint.sh)",
    "pytest-xdist": "a pytest plug-in: scripts/test.sh spreads the suite over the cores with its `-n` option",
    "pre-commit": "runs the lint hooks of .pre-commit-config.yaml on each commit",
    "xfuser": "imported by parallel/xfuser.py (GPU only, so not installed by the `dev` extra)",
    "ftfy": "diffusers' Wan prompt cleaning (reused by the pipelines) fixes text with it when it is installed",
    "python-multipart": "FastAPI parses the multipart bodies of `skyreels-v3 serve` (uploaded inputs) with it",
    "fa3-fwd": "models/attention_backends.py imports its fa3_fwd_interface from a tuple of FA3 packages (GPU only)",
}


def normalize(name: str) -> str:
    """PEP 503 name normalisation (`Pillow`, `huggingface_hub` -> `pillow`, `huggingface-hub`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> tuple[str, set[str]]:
    """`"skyreels-diffusers[quant,app]>=1"` -> (`"skyreels-diffusers"`, {"quant", "app"})."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
    assert match, f"unparsable requirement {requirement!r}"
    extras = {extra.strip() for extra in (match.group(2) or "").split(",") if extra.strip()}
    return normalize(match.group(1)), extras


def declared(extras: set[str]) -> set[str]:
    """Distributions installed by the core list plus `extras`, following self-references like `pkg[a,b]`."""
    project = PYPROJECT["project"]
    own = normalize(project["name"])
    names, pending, seen = set(), list(project["dependencies"]), set()
    for extra in extras:
        pending += project["optional-dependencies"][extra]
    while pending:
        name, sub_extras = requirement_name(pending.pop())
        if name != own:
            names.add(name)
            continue
        for extra in sub_extras - seen:
            seen.add(extra)
            pending += project["optional-dependencies"][extra]
    return names


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Top-level absolute imports of every .py file under `folder` -> the files importing them (relative paths)."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        if "fixtures" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                callee = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if callee in ("import_module", "importorskip") and isinstance(node.args[0].value, str):
                    names = [node.args[0].value]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def local_modules() -> set[str]:
    """Names that resolve to the repository itself: the package, tests, and the scripts/bench files on sys.path."""
    names = {PACKAGE, "tests"}
    for folder in ("scripts", "bench", "tests"):
        names |= {path.stem for path in (ROOT / folder).rglob("*.py")}
    return names


def third_party(folder: str) -> dict[str, set[str]]:
    local = local_modules()
    return {
        module: files
        for module, files in imported_modules(ROOT / folder).items()
        if module not in sys.stdlib_module_names and module not in local
    }


def distribution(module: str) -> str:
    return normalize(MODULE_TO_DIST.get(module, module))


def test_src_imports_are_declared():
    all_extras = set(PYPROJECT["project"]["optional-dependencies"])
    available = declared(all_extras)
    missing = {
        f"{module} (as {distribution(module)}): {', '.join(sorted(files))}"
        for module, files in third_party("src").items()
        if distribution(module) not in available and module not in UNDECLARED_OK
    }
    assert not missing, "imported by src/ but declared nowhere in pyproject.toml:\n" + "\n".join(sorted(missing))


def test_test_imports_are_in_the_dev_extra():
    available = declared({"dev"})
    missing = {
        f"{module} (as {distribution(module)}): {', '.join(sorted(files))}"
        for module, files in third_party("tests").items()
        if distribution(module) not in available and module not in UNDECLARED_OK
    }
    assert not missing, "imported by tests/ but not installed by `.[dev]`:\n" + "\n".join(sorted(missing))


def test_every_declared_dependency_is_used():
    used_by_src = {distribution(module) for module in third_party("src")}
    used = used_by_src | {distribution(module) for module in third_party("tests")}
    exempt = {normalize(name) for name in NOT_IMPORTED_OK}
    own = normalize(PYPROJECT["project"]["name"])
    core = [requirement_name(requirement)[0] for requirement in PYPROJECT["project"]["dependencies"]]
    unused = [f"core: {name}" for name in core if name not in used_by_src and name not in exempt]
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        for name, _ in map(requirement_name, requirements):
            if name != own and name not in used and name not in exempt:
                unused.append(f"[{extra}]: {name}")
    assert not unused, "declared in pyproject.toml but imported nowhere:\n" + "\n".join(unused)


def test_exception_lists_are_current():
    """An exception that no longer applies is removed rather than kept as a silent allowance."""
    all_declared = declared(set(PYPROJECT["project"]["optional-dependencies"]))
    src_modules = set(third_party("src"))
    assert set(UNDECLARED_OK) <= src_modules, "UNDECLARED_OK lists modules src/ no longer imports"
    assert not {distribution(m) for m in UNDECLARED_OK} & all_declared, "UNDECLARED_OK lists a declared module"
    assert {normalize(name) for name in NOT_IMPORTED_OK} <= all_declared, "NOT_IMPORTED_OK lists undeclared names"


def test_constraints_pin_only_declared_distributions():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact `name==version` pin"
            pins[normalize(name)] = version.strip()
    all_declared = declared(set(PYPROJECT["project"]["optional-dependencies"]))
    assert set(pins) <= all_declared, f"pinned but not declared: {sorted(set(pins) - all_declared)}"
    assert pins.get("torch") == "2.13.0", "constraints.txt must pin torch==2.13.0 (the CPU wheel on disk)"
    dev = declared({"dev"}) - {"xfuser"}
    assert dev <= set(pins), f"installed by `.[dev]` but not pinned: {sorted(dev - set(pins))}"


def test_pre_commit_pins_the_dev_ruff():
    dev_ruff = [r for r in PYPROJECT["project"]["optional-dependencies"]["dev"] if requirement_name(r)[0] == "ruff"]
    assert len(dev_ruff) == 1 and "==" in dev_ruff[0], "the dev extra pins ruff exactly"
    version = dev_ruff[0].split("==")[1].strip()
    hooks = (ROOT / ".pre-commit-config.yaml").read_text()
    pins = set(re.findall(r"ruff==([0-9][^\"'\s\]]*)", hooks))
    assert pins == {version}, f".pre-commit-config.yaml pins ruff {sorted(pins)}, the dev extra ruff=={version}"
