"""distill.files: atomic writes."""

import json
import os
import stat

import pytest

from distill.errors import DistillError
from distill.files import atomic_path, write_text


def test_atomic_write_has_umask_permissions_not_mkstemp_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a" / "out.txt", "hi")
    finally:
        os.umask(old)
    p = tmp_path / "a" / "out.txt"
    assert p.read_text() == "hi"
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~0o022 or os.name != "posix"
    assert [q.name for q in p.parent.iterdir()] == ["out.txt"]  # no temp file left


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DistillError, match="cannot create output folder"):
        (tmp_path / "file").write_text("")
        write_text(tmp_path / "file" / "sub" / "y.txt", "z")


def test_output_is_current_needs_the_output_and_the_same_inputs(tmp_path):
    from distill.files import output_is_current

    out, man = tmp_path / "w.safetensors", tmp_path / "manifest.json"
    assert not output_is_current(out, man, {"a": 1})
    man.write_text(json.dumps({"inputs": {"a": 1}}))
    assert not output_is_current(out, man, {"a": 1})  # no output file
    out.write_bytes(b"x")
    assert output_is_current(out, man, {"a": 1})
    assert not output_is_current(out, man, {"a": 2})
    man.write_text("{not json")
    assert not output_is_current(out, man, {"a": 1})
    man.write_text("[1, 2]")
    assert not output_is_current(out, man, {"a": 1})


def test_torch_threads_sets_and_restores():
    import torch

    from distill.engine.device import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before
