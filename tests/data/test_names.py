"""File names from data (vdiff.data.names): a name never escapes its folder, different names stay different."""

from __future__ import annotations

import pytest

from vdiff.data.names import MAX_NAME, safe_name, unique_names

HOSTILE = ["../../x", "/abs/path", "sub/dir/k", "..", ".", "", " ", "a b", "a:b", "a?b", "C:\\win", "x" * 200,
           "caf\u00e9", "bad\udcffbytes", "-rf", "nul\x00byte", "dots.in.name"]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_a_name_from_data_becomes_one_plain_file_name(name, tmp_path):
    safe = safe_name(name)
    assert safe and len(safe) <= MAX_NAME and "/" not in safe and "\\" not in safe and "." not in safe
    assert all(c.isascii() and (c.isalnum() or c in "_-") for c in safe)
    target = tmp_path / f"{safe}-sample.mp4"
    assert target.resolve().parent == tmp_path.resolve()
    target.write_bytes(b"")  # the file system takes it


def test_plain_names_are_kept_and_changed_names_stay_distinct():
    assert [safe_name(n) for n in ("clip_0001", "scene-0001", "A")] == ["clip_0001", "scene-0001", "A"]
    assert safe_name("../../x").startswith("x-") and safe_name("sub/dir/k").startswith("sub_dir_k-")
    changed = [safe_name(n) for n in ("a:b", "a?b", "a b", "a/b")]  # all read "a_b", their hashes differ
    assert len(set(changed)) == 4 and all(n.startswith("a_b-") for n in changed)
    assert safe_name("../../x") == safe_name("../../x")  # a pure function of the name


def test_unique_names_number_repeats_case_insensitively():
    names = unique_names(["dup", "dup", "Dup", "dup-2", "../../x", "../../x"])
    assert names[:4] == ["dup", "dup-2", "Dup-3", "dup-2-2"]
    assert names[5] == names[4] + "-2"
    assert len({n.casefold() for n in names}) == len(names)
