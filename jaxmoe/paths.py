"""Output-folder safety shared by every tool that writes a folder (jaxmoe-convert and its export,
jaxmoe-train's workdir and merge): a path that cannot be a folder, an output that overlaps its
input, and replacing a finished folder so that a failure never leaves a half-written one."""

from __future__ import annotations

import os
import shutil
import tempfile


def folder_problem(path: str) -> str | None:
    """Why `path` cannot be (or become) a folder: it, or a folder above it, is a file."""
    p = os.path.abspath(path)
    while True:
        if os.path.exists(p):
            if os.path.isdir(p):
                return None
            return f"{p} is a file, not a folder" if p == os.path.abspath(path) else \
                f"{p} (above it) is a file, not a folder"
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def overlap(path: str, other: str) -> str | None:
    """How `path` overlaps the folder `other` (resolved paths, so a symlink counts as the folder
    itself): "is", "inside", "contains", or None when neither holds the other."""
    a, b = os.path.realpath(path), os.path.realpath(other)
    if a == b:
        return "is"
    common = os.path.commonpath([a, b])
    return "inside" if common == b else "contains" if common == a else None


def replace_folder(tmp: str, out_dir: str) -> None:
    """Rename `tmp` to OUT_DIR. A previous OUT_DIR (checked replaceable by the caller) is moved
    to a fresh `OUT_DIR.old-*` sibling and deleted only once the new folder is in place; no
    other folder is ever removed."""
    out = os.path.abspath(out_dir)
    old = None
    if os.path.exists(out):
        if os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        else:
            old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-",
                                   dir=os.path.dirname(out))
            os.rename(out, old)  # (onto the empty folder just made: allowed by rename(2))
    os.rename(tmp, out)
    fsync_dir(os.path.dirname(out))
    if old:
        shutil.rmtree(old)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
