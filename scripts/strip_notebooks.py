"""Strip outputs, execution counts and per-run metadata from notebooks, so they are stored clean.

    python scripts/strip_notebooks.py [--check] [PATH ...]     (default: notebooks/*.ipynb)

--check changes nothing and exits 1 listing the notebooks that still hold outputs (a pre-commit step
or CI can run it). Cell ids, sources and the kernelspec are kept.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_METADATA_DROP = ("execution", "collapsed", "scrolled")


def strip(nb) -> bool:
    """Remove outputs and run metadata in place; True when anything changed."""
    changed = False
    for cell in nb.cells:
        for key in CELL_METADATA_DROP:
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
    for key in ("widgets", "varInspector"):
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--check", action="store_true", help="report, do not write; exit 1 if unclean")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    for path in dirty:
        print(f"{'has outputs' if args.check else 'stripped'}: {path}")
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
