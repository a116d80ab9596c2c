"""Embedding cache: round trip, fp16 storage, streaming, stale keys refused, kill + resume gives
byte-identical shards, rank-sharded writing (simulated ranks) gives the one-process bytes."""

import pytest
import torch

import distill.teacher.cache as cache_mod
from distill.errors import DistillError
from distill.teacher import build_random_teacher
from distill.teacher.cache import EmbeddingCache
from distill.teacher.regions import embed_regions_sharded, embed_regions_to_cache, region_embeddings


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


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if not p.name.startswith(".")}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_sharded_writing_equals_one_process(tmp_path, world):
    """Ranks of ``world`` (run here one after the other, in reverse, rank 0 last) each write their
    shards of the plan; rank 0 then lists them: the files equal write() + close() byte for byte."""
    from distill.engine.distributed import rank_shards

    ids, embs = _data(n=11)
    key = {"teacher": "abc"}
    _fill(tmp_path / "ref", ids, embs, key)
    root = tmp_path / f"w{world}"
    written = {}
    for rank in reversed(range(world)):
        c = EmbeddingCache(root, key, shard_size=4)
        plan = c.plan(ids)
        assert [len(p[1]) for p in plan] == [4, 4, 3] and [p[0] for p in plan] == [0, 1, 2]
        for j in rank_shards(len(plan), rank, world):
            k, sids = plan[j]
            assert c.shard_done(k, sids) is None
            written[k] = c.write_shard(k, sids, [embs[ids.index(i)] for i in sids])
            assert c.shard_done(k, sids) == written[k]  # what a resumed run or rank 0 finds on disk
        assert not (root / "index.json").exists()  # only rank 0 writes the index, after all ranks
    c.finish(plan, {k: e for k, e in written.items() if k % world == 0})  # rank 0 reads the others' shards
    assert _files(root) == _files(tmp_path / "ref")
    assert c.complete and len(c) == 11 and all(c.get(i).equal(embs[ids.index(i)].half().float()) for i in ids)


def test_sharded_resume_and_stale_shards(tmp_path):
    ids, embs = _data(n=11)
    key = {"teacher": "abc"}
    c = EmbeddingCache(tmp_path, key, shard_size=4)
    plan = c.plan(ids)
    c.write_shard(*plan[1], [embs[ids.index(i)] for i in plan[1][1]])
    assert c.shard_done(1, plan[1][1][:3]) is None  # other images: not this shard
    assert EmbeddingCache(tmp_path, {"teacher": "xyz"}, shard_size=4).shard_done(*plan[1]) is None  # other key
    with pytest.raises(DistillError, match="shard-00000.safetensors: shard missing"):
        c.finish(plan)
    (tmp_path / "shard-00002.safetensors").write_bytes(b"garbage")
    assert c.shard_done(*plan[2]) is None
    with pytest.raises(DistillError, match="out of order"):
        c.add_shards([c.shard_done(*plan[1])])


class _Images:
    """Images of ids 0..n-1 and their boxes; counts how often each image is read."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(4)
        self.data = {i: (torch.rand(3, 36, 44, generator=g), torch.tensor([[2.0, 3.0, 30.0, 35.0], [5.0, 5.0, 5.0, 9.0], [1.0, 1.0, 20.0, 12.0]])) for i in range(n)}
        self.reads = []

    def __call__(self, iid):
        self.reads.append(iid)
        return self.data[iid]


def test_embed_regions_sharded_one_process_resumes(tmp_path):
    t = build_random_teacher(seed=0)
    key = {"teacher": t.fingerprint, "mode": "crop"}
    load = _Images(7)
    ids = list(range(7))
    ref = EmbeddingCache(tmp_path / "ref", key, shard_size=3)
    stats = embed_regions_sharded(t, ids, load, ref, images_per_batch=2)
    assert stats == {"images": 7, "skipped_boxes": 7, "clipped_boxes": 0, "shards": 3, "shards_skipped": 0}
    assert ref.complete and ref.image_ids() == ids
    # what a killed run leaves: shards 0 and 2 on disk, no index -> only shard 1 is embedded again
    run = tmp_path / "run"
    run.mkdir()
    for name in ("shard-00000.safetensors", "shard-00002.safetensors"):
        (run / name).write_bytes((tmp_path / "ref" / name).read_bytes())
    load.reads.clear()
    stats = embed_regions_sharded(t, ids, load, EmbeddingCache(run, key, shard_size=3), images_per_batch=2)
    assert stats["shards_skipped"] == 2 and stats["images"] == 3 and load.reads == [3, 4, 5]
    assert _files(run) == _files(tmp_path / "ref")
    boxes = [load.data[i][1] for i in ids]
    want = region_embeddings(t, [load.data[i][0] for i in ids], boxes)
    assert all(ref.get(i).equal(w.half().float()) for i, w in zip(ids, want))
