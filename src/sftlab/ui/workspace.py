"""Files only inside the workspace: relative paths that resolve (symlinks followed) under its root."""

from __future__ import annotations

import os
from pathlib import Path

from sftlab.errors import SftlabError


class OutsideWorkspace(SftlabError):
    """A path that is absolute, climbs out with '..', or resolves (through a symlink) outside the workspace."""


def resolve_inside(root: str | Path, rel: str) -> Path:
    """`root/rel`, refused when rel is absolute, empty, contains '..' or a symlink leads outside root."""
    root_real = Path(os.path.realpath(root))
    if not isinstance(rel, str) or not rel.strip():
        raise OutsideWorkspace("empty path")
    if rel.startswith(("/", "\\", "~")) or os.path.isabs(rel) or ":" in rel.split("/")[0]:
        raise OutsideWorkspace(f"{rel}: absolute paths are refused; give a path inside the workspace")
    parts = Path(rel).parts
    if ".." in parts or "\x00" in rel:
        raise OutsideWorkspace(f"{rel}: '..' is refused; give a path inside the workspace")
    real = Path(os.path.realpath(root_real / rel))
    if real != root_real and root_real not in real.parents:
        raise OutsideWorkspace(f"{rel}: resolves outside the workspace (symlink)")
    return real


def relative_name(root: str | Path, path: str | Path) -> str:
    return Path(os.path.realpath(path)).relative_to(os.path.realpath(root)).as_posix()
