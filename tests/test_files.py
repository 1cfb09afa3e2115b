"""mlmd_lab.files: the one atomic-write helper, and that every file replacement in mlmd_lab goes through it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mlmd_lab.files import atomic_path, atomic_write_bytes, atomic_write_text

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "mlmd_lab"


def test_atomic_write_bytes_and_text(tmp_path):
    target = tmp_path / "sub" / "data.bin"
    assert atomic_write_bytes(target, b"\x00\x01", fsync=True) == target
    assert target.read_bytes() == b"\x00\x01"
    assert atomic_write_text(target, "é\n").read_text(encoding="utf-8") == "é\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.bin"]  # no temporary left


def test_failed_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "checkpoint.pkl"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target, fsync=True) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pkl"]


def test_folder_replacement_is_whole_or_not_at_all(tmp_path):
    """A folder export replaces the old one whole; without replace_folder=True an existing folder is refused,
    and a failed write leaves the old folder as it was."""
    from mlmd_lab.errors import MLMDError

    target = tmp_path / "n2p2"
    target.mkdir()
    (target / "old.data").write_text("old")
    with pytest.raises(MLMDError, match="already exists"), atomic_path(target) as tmp:
        tmp.mkdir()
    with pytest.raises(RuntimeError), atomic_path(target, replace_folder=True) as tmp:
        tmp.mkdir()
        (tmp / "new.data").write_text("half")
        raise RuntimeError("killed mid-export")
    assert [p.name for p in target.iterdir()] == ["old.data"]
    with atomic_path(target, replace_folder=True) as tmp:
        tmp.mkdir()
        (tmp / "new.data").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.data"]
    assert [p.name for p in tmp_path.iterdir()] == ["n2p2"]  # neither the temporary nor the old folder is left


def test_handle_writers_keep_the_target_name(tmp_path):
    """np.savez on a path appends .npz; through an open handle it writes exactly the temporary."""
    import numpy as np

    target = tmp_path / "restart.npz"
    with atomic_path(target, fsync=True) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, x=np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["restart.npz"]
    assert np.load(target)["x"].tolist() == [0, 1, 2]


def test_no_hand_written_replace_outside_files_module():
    """tmp + os.replace (or rename) by hand is done once, in mlmd_lab/files.py; everything else uses it."""
    offenders = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        if path == PACKAGE_ROOT / "files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("replace", "rename")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "os"):
                offenders.append(f"{path.relative_to(PACKAGE_ROOT.parent)}:{node.lineno}")
    assert not offenders, "use mlmd_lab.files.atomic_path / atomic_write_text / atomic_write_bytes: " + ", ".join(
        offenders)
