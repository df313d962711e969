"""Files only inside the workspace: traversal, absolute paths and symlinks out are refused."""

from __future__ import annotations

import os

import pytest

from sftlab.ui.workspace import OutsideWorkspace, resolve_inside


@pytest.fixture()
def ws(tmp_path):
    root = tmp_path / "ws"
    (root / "saves" / "run").mkdir(parents=True)
    (root / "data.jsonl").write_text("{}\n")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("secret")
    os.symlink(outside, root / "link-out")
    os.symlink(root / "saves", root / "link-in")
    return root


@pytest.mark.parametrize("rel", ["data.jsonl", "saves/run", "saves/./run", "link-in/run", "not-yet/created.txt"])
def test_paths_inside_are_resolved(ws, rel):
    assert str(resolve_inside(ws, rel)).startswith(os.path.realpath(ws))


@pytest.mark.parametrize("rel, why", [
    ("../secret/key.txt", "'..'"), ("saves/../../secret", "'..'"), ("/etc/passwd", "absolute"),
    ("~/x", "absolute"), ("link-out/key.txt", "outside"), ("link-out", "outside"), ("", "empty"),
    ("C:/Windows", "absolute"),
])
def test_paths_out_are_refused(ws, rel, why):
    with pytest.raises(OutsideWorkspace, match=why):
        resolve_inside(ws, rel)
