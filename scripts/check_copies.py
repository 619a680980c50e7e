"""Keep `# Copied from` code equal to its source (what diffusers' `make fix-copies` does for diffusers).

A function or class of `src/skyreels_diffusers` preceded directly by

    # Copied from skyreels_diffusers.pipelines.pipeline_skyreels_v3_extension.SkyReelsV3ExtensionPipeline.__init__

(optionally followed by `with Old->New, Other->Else` replacements applied to the source) must be the source's code,
from its `def` / `class` line to its end, up to indentation. Decorators stay outside the comparison: the marker sits
between them and the `def`.

    python scripts/check_copies.py          # exit 1 and a diff for every copy that drifted
    python scripts/check_copies.py --fix    # rewrite the drifted copies from their sources
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "skyreels_diffusers"
MARKER = re.compile(rf"^\s*# Copied from ({PACKAGE}(?:\.\w+)+)(?:\s+with\s+(.+))?\s*$")


@dataclass
class Copy:
    path: Path
    first: int  # 0-based index of the copy's `def` / `class` line
    last: int  # 0-based index of its last line
    source: str  # dotted path of the original
    replacements: list[tuple[str, str]]


def definitions(tree: ast.AST, prefix: str = "") -> dict[str, ast.AST]:
    """Qualified name -> function or class node, at any nesting of classes."""
    found = {}
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            found[name] = node
            if isinstance(node, ast.ClassDef):
                found.update(definitions(node, name + "."))
    return found


def find_copies(path: Path) -> list[Copy]:
    lines = path.read_text().splitlines()
    starts = {node.lineno - 1: node for node in definitions(ast.parse("\n".join(lines))).values()}
    copies = []
    for index, line in enumerate(lines):
        match = MARKER.match(line)
        if match is None:
            continue
        node = starts.get(index + 1)
        if node is None:
            raise SystemExit(f"{path}:{index + 1}: `# Copied from` must sit directly above a def or class")
        replacements = [tuple(part.strip().split("->")) for part in (match.group(2) or "").split(",") if part.strip()]
        copies.append(Copy(path, index + 1, node.end_lineno - 1, match.group(1), replacements))
    return copies


def source_code(dotted: str, src: Path = SRC) -> str:
    """The code of `package.module.Qualified.name`, from its `def` / `class` line to its end."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = src.joinpath(*parts[:split]).with_suffix(".py")
        if module.is_file():
            lines = module.read_text().splitlines()
            node = definitions(ast.parse("\n".join(lines))).get(".".join(parts[split:]))
            if node is None:
                break
            return "\n".join(lines[node.lineno - 1 : node.end_lineno])
    raise SystemExit(f"`# Copied from {dotted}`: no such function or class under {src}")


def expected_code(copy: Copy, src: Path = SRC) -> str:
    code = textwrap.dedent(source_code(copy.source, src))
    for old, new in copy.replacements:
        code = code.replace(old, new)
    return code


def check(src: Path = SRC, fix: bool = False) -> list[str]:
    """Every drifted copy under `src` as a unified diff (rewritten from its source with `fix`)."""
    problems = []
    for path in sorted((src / PACKAGE).rglob("*.py")):
        for copy in reversed(find_copies(path)):  # bottom up: fixing one leaves the line numbers above valid
            lines = path.read_text().splitlines()
            indent = re.match(r"\s*", lines[copy.first]).group(0)
            ours = textwrap.dedent("\n".join(lines[copy.first : copy.last + 1]))
            theirs = expected_code(copy, src)
            if ours == theirs:
                continue
            where = f"{path.relative_to(src.parent)}:{copy.first + 1}"
            diff = difflib.unified_diff(theirs.splitlines(), ours.splitlines(), copy.source, where, lineterm="")
            problems.append(f"{where} differs from {copy.source}:\n" + "\n".join(diff))
            if fix:
                fixed = [indent + line if line else line for line in theirs.splitlines()]
                lines[copy.first : copy.last + 1] = fixed
                path.write_text("\n".join(lines) + "\n")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="rewrite drifted copies from their sources")
    parser.add_argument("--src", type=Path, default=SRC, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    problems = check(args.src, fix=args.fix)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems and not args.fix:
        print(f"{len(problems)} copies drifted: run `python scripts/check_copies.py --fix`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
