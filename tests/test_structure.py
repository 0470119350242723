"""The codebase's own rules, checked: short functions, one home per idea, the core free of the UI."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80  # body lines of any function in kdeformer/ or widgets/, docstring aside


def function_lengths(path: Path):
    """(name, first line, body lines without the docstring) of every function in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body = body[1:]
            if body:
                yield node.name, node.lineno, body[-1].end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("folder", ["kdeformer", "widgets"])
def test_no_function_is_longer_than_80_lines(folder):
    long = [f"{path.relative_to(ROOT)}:{line} {name} ({n} lines)"
            for path in sorted((ROOT / folder).rglob("*.py"))
            for name, line, n in function_lengths(path) if n > MAX_LINES]
    assert not long, "functions over 80 lines: " + ", ".join(long)


def test_defaults_have_one_home():
    """The default settings are written once (kdeformer/defaults.py); every other place reads them."""
    from kdeformer.defaults import KDE_DEFAULTS

    offenders = []
    for path in sorted((ROOT / "kdeformer").rglob("*.py")) + sorted((ROOT / "widgets").rglob("*.py")):
        if path.name == "defaults.py":
            continue
        text = path.read_text()
        for pattern in (f'sampling: str = "{KDE_DEFAULTS.sampling}"', f'sampling="{KDE_DEFAULTS.sampling}",'):
            if pattern in text:
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert not offenders, offenders
