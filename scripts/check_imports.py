"""Does every module the project imports import here, and does the data flow one way (no module of
pipeline/ imports train/, lazily or not)? One sentence either way.

    python scripts/check_imports.py          # exit 0: all import; 1: the sentence names the missing

The list: every absolute import in pipeline/ and train/ (found with ast, so new dependencies are
checked too) that is neither the standard library nor the project, plus what DALI imports on
first use (their own requirements, which a --no-deps install would leave out), plus
pytest: scripts/gpu_check.sh --stage tests runs the suite, and the offline bundle brings it.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("pipeline", "train")
# DALI 2.x (its conditionals and Python operators) at import time.
RUNTIME_NEEDS = ["six", "packaging", "gast", "astunparse", "optree", "nvtx", "makefun", "libcst"]
TEST_NEEDS = ["pytest"]


def project_imports(root: Path = ROOT) -> list[str]:
    """Third-party modules imported anywhere in the project's packages, sorted."""
    found = set()
    for path in sorted(p for pkg in PROJECT for p in (root / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    top = lambda m: m.split(".")[0]  # noqa: E731
    return sorted(m for m in found if top(m) not in sys.stdlib_module_names and top(m) not in PROJECT + ("__future__",))


def backward_imports(root: Path = ROOT) -> list[str]:
    """"pipeline/x.py:N imports train.y" for each import of train/ in pipeline/, inside functions
    too: train imports pipeline, so one the other way makes a circle (and drags torch into the
    data commands)."""
    found = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            found += [f"{path.relative_to(root)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "train"]
    return found


def missing(modules: list[str]) -> dict[str, str]:
    """{module: why} for each that does not import."""
    why = {}
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # ImportError, or a library's own failure while loading
            why[m] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return why


def main() -> int:
    backward = backward_imports()
    if backward:
        print(f"the data flow runs backwards: {'; '.join(backward)} (pipeline/ must not import train/).", file=sys.stderr)
        return 1
    modules = sorted(set(project_imports()) | set(RUNTIME_NEEDS) | set(TEST_NEEDS))
    bad = missing(modules)
    if bad:
        print(f"{len(bad)} of {len(modules)} modules the project needs do not import: "
              + "; ".join(f"{m} ({why})" for m, why in bad.items()) + ".", file=sys.stderr)
        return 1
    print(f"all {len(modules)} modules the project imports import ({', '.join(modules)}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
