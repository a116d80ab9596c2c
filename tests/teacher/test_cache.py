"""Embedding cache: round trip, fp16 storage, streaming, stale keys refused, kill + resume gives
byte-identical shards."""

import pytest
import torch

import distill.teacher.cache as cache_mod
from distill.errors import DistillError
from distill.teacher import build_random_teacher
from distill.teacher.cache import EmbeddingCache
from distill.teacher.regions import embed_regions_to_cache, region_embeddings


def _data(n=11, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [100 + 3 * i for i in range(n)]
    return ids, [torch.randn(int(torch.randint(0, 5, (1,), generator=g)), d, generator=g) for _ in ids]


def _fill(root, ids, embs, key, **kw):
    c = EmbeddingCache(root, key, shard_size=4, **kw)
    for i in c.missing(ids):
        c.write([i], [embs[ids.index(i)]])
    c.close()
    return c


def test_round_trip_fp16_fp32_and_streaming(tmp_path):
    ids, embs = _data()
    key = {"teacher": "abc", "proposals": "p1"}
    c16 = _fill(tmp_path / "a", ids, embs, key)
    assert len(c16.index["shards"]) == 3 and c16.complete
    for i, e in zip(ids, embs):
        got = EmbeddingCache(tmp_path / "a", key, readonly=True).get(i)
        assert got.dtype == torch.float32 and got.shape == e.shape
        assert torch.equal(got, e.half().float())
    c32 = _fill(tmp_path / "b", ids, embs, key, dtype="fp32")
    assert all(torch.equal(c32.get(i), e) for i, e in zip(ids, embs))
    # iteration: shard by shard, in write order, one shard dict at a time
    shards = list(c32.iter_shards())
    assert [len(s) for s in shards] == [4, 4, 3]
    assert [i for i, _ in c32] == ids
    c32.verify()
    with pytest.raises(DistillError, match="not in the embedding cache"):
        c32.get(7)


def test_stale_key_refused_with_reason(tmp_path):
    ids, embs = _data()
    _fill(tmp_path, ids, embs, {"teacher": "abc", "proposals": "p1"})
    with pytest.raises(DistillError) as e:
        EmbeddingCache(tmp_path, {"teacher": "xyz", "proposals": "p1"})
    assert "stale" in str(e.value) and "teacher: abc -> xyz" in str(e.value)
    with pytest.raises(DistillError, match="dtype: fp16 -> fp32"):
        EmbeddingCache(tmp_path, {"teacher": "abc", "proposals": "p1"}, dtype="fp32")
    with pytest.raises(DistillError, match="no embedding cache"):
        EmbeddingCache(tmp_path / "none", {}, readonly=True)


def test_killed_mid_write_then_resumed_is_byte_identical(tmp_path, monkeypatch):
    ids, embs = _data(n=14)
    key = {"teacher": "abc"}
    _fill(tmp_path / "ref", ids, embs, key)

    real = cache_mod._save_shard
    calls = {"n": 0}

    def dying(tensors, path, metadata):
        calls["n"] += 1
        if calls["n"] == 3:  # killed while writing the third shard (its temp file never renamed)
            raise KeyboardInterrupt
        real(tensors, path, metadata)

    monkeypatch.setattr(cache_mod, "_save_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        _fill(tmp_path / "run", ids, embs, key)
    monkeypatch.setattr(cache_mod, "_save_shard", real)
    partial = EmbeddingCache(tmp_path / "run", key)
    assert len(partial) == 8 and not partial.complete
    assert partial.missing(ids) == ids[8:]
    assert not list((tmp_path / "run").glob(".*tmp*"))  # no half-written file left behind
    _fill(tmp_path / "run", ids, embs, key)  # resume
    ref_files = sorted(p.name for p in (tmp_path / "ref").glob("shard-*"))
    run_files = sorted(p.name for p in (tmp_path / "run").glob("shard-*"))
    assert ref_files == run_files and len(ref_files) == 4
    for name in ref_files:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "run" / name).read_bytes()
    assert (tmp_path / "ref" / "index.json").read_bytes() == (tmp_path / "run" / "index.json").read_bytes()


def test_write_errors(tmp_path):
    c = EmbeddingCache(tmp_path, {"k": 1}, shard_size=2)
    c.write([1], [torch.zeros(2, 3)])
    with pytest.raises(DistillError, match="written twice"):
        c.write([1], [torch.zeros(2, 3)])
    with pytest.raises(DistillError, match="NaN"):
        c.write([2], [torch.full((1, 3), float("nan"))])
    with pytest.raises(DistillError, match="cache_dtype"):
        EmbeddingCache(tmp_path / "x", {}, dtype="bf8")


def test_region_embeddings_to_cache_resumes(tmp_path):
    t = build_random_teacher(seed=0)
    g = torch.Generator().manual_seed(1)
    items = [(i, torch.rand(3, 40, 48, generator=g), torch.tensor([[2.0, 3.0, 30.0, 35.0], [5.0, 5.0, 5.0, 9.0]])) for i in range(5)]
    key = {"teacher": t.fingerprint, "mode": "crop"}
    c = EmbeddingCache(tmp_path, key, shard_size=2)
    stats = embed_regions_to_cache(t, items[:3], c, images_per_batch=2)
    assert stats == {"images": 3, "skipped_boxes": 3, "clipped_boxes": 0}
    c = EmbeddingCache(tmp_path, key, shard_size=2)
    stats = embed_regions_to_cache(t, items, c, images_per_batch=2)
    assert stats["images"] == 2 and len(c) == 5  # only the two new images were embedded
    ref = region_embeddings(t, [it[1] for it in items], [it[2] for it in items])
    for (i, _, _), r in zip(items, ref):
        assert torch.allclose(c.get(i), r.half().float(), atol=0)
