"""Replace (or append) one marked section of BENCHMARKS.md, leaving the others untouched."""

from __future__ import annotations

import os


def write_section(path: str, text: str, begin: str, end: str) -> None:
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if begin in old and end in old:
        a, b = old.index(begin), old.index(end) + len(end)
        new = old[:a] + text + old[b:]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    with open(path, "w") as f:
        f.write(new)
