import os

import pytest

from storage.ids import UnsafeIdError, check_id, safe_join


@pytest.mark.parametrize("good", ["S0000", "smile", "a", "A-b_c", "x" * 64])
def test_valid_ids(good):
    assert check_id(good, "subject") == good


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "a\\b", "/abs", ".hidden", "-x", "_x", "x" * 65,
                                 "a b", "é", None, 3])
def test_unsafe_ids_rejected(bad):
    with pytest.raises(UnsafeIdError, match="subject id"):
        check_id(bad, "subject")


def test_safe_join_refuses_escape(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    assert safe_join(root, "a", "b") == root.resolve() / "a" / "b"
    with pytest.raises(UnsafeIdError, match="leaves its root"):
        safe_join(root, "..", "outside")
    with pytest.raises(UnsafeIdError, match="leaves its root"):
        safe_join(root, "link", "file")
