"""Write one benchmark's section of benchmarks/RESULTS.md, stamped with the machine and versions.

Each script owns the block between `<!-- BEGIN name -->` and `<!-- END name -->`; running one
script rewrites only its own block, so the file gathers every benchmark's latest figures.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nWritten by the scripts in `benchmarks/` (run on demand, never in CI).\n"


def machine_line() -> str:
    """One line naming the machine, the date and the versions that produced a figure."""
    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = "CPU only" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    return (
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}, {os.cpu_count()} cores, {device}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {numpy.__version__}, "
        f"Python {platform.python_version()}"
    )


def write_section(name: str, title: str, body: str, path: Path = RESULTS) -> Path:
    """Replace (or append) the block `name` of RESULTS.md with `title`, the machine line and `body`."""
    text = path.read_text() if path.exists() else HEADER
    block = f"<!-- BEGIN {name} -->\n## {title}\n\n_Machine: {machine_line()}_\n\n{body.strip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
