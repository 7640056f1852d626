"""Embedded models assembled from their wheels' parts: checked, atomic, and safe to assemble from several
processes at once (test workers, the hosts of a launch)."""

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from mwjax.converters import embedded


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """A two-part model whose parts are "installed" as local files."""
    chunks = [bytes(range(256)) * 4000, b"tail" * 1000]
    members = []
    for i, chunk in enumerate(chunks):
        (tmp_path / f"part{i}").write_bytes(chunk)
        members.append(embedded.WheelMember(package=f"p{i}", version="1", module=f"m{i}", member=f"part{i}"))
    monkeypatch.setattr(embedded, "_installed", lambda part: tmp_path / part.member)
    return members, b"".join(chunks)


def test_parts_are_joined_and_checked(tmp_path, parts):
    members, whole = parts
    spec = embedded.EmbeddedModel("m.gguf", tuple(members), "test", hashlib.sha256(whole).hexdigest())
    target = tmp_path / "cache" / "m.gguf"
    with ThreadPoolExecutor(4) as pool:  # four assemblies at once, each must succeed
        for done in [pool.submit(embedded._assemble, spec, target) for _ in range(4)]:
            done.result()
    assert target.read_bytes() == whole
    assert [p.name for p in target.parent.iterdir()] == ["m.gguf"]  # no partial file left behind

    damaged = embedded.EmbeddedModel("d.gguf", tuple(members), "test", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256 .* is not the expected 0000"):
        embedded._assemble(damaged, target.parent / "d.gguf")
    assert [p.name for p in target.parent.iterdir()] == ["m.gguf"]
