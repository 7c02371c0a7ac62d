"""The one atomic writer: a failed write leaves the previous version and no temporary files."""
import pytest

from memoir.atomic import atomic_file, atomic_folder, write_text


def test_file_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "result.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_folder_swapped_whole_or_not_at_all(tmp_path):
    path = tmp_path / "save"
    with atomic_folder(path) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "b.txt").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(path) as tmp:
            (tmp / "a.txt").write_text("2")
            raise KeyboardInterrupt
    assert {p.name: p.read_text() for p in path.iterdir()} == {"a.txt": "1", "b.txt": "1"}
    with atomic_folder(path) as tmp:
        (tmp / "a.txt").write_text("3")
    assert {p.name: p.read_text() for p in path.iterdir()} == {"a.txt": "3"}  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]
