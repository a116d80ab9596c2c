"""A sharded safetensors cache of per-image embeddings (teacher region / pixel embeddings).

Layout under ``root``::

    index.json                 {"key": {...}, "key_hash", "dtype", "shard_size", "complete",
                                "shards": [{"file", "image_ids", "rows", "sha256"}, ...]}
    shard-00000.safetensors    one tensor per image, named by its image id

The cache is keyed by whatever produced it (teacher fingerprint, proposal hash, mode, scales ...):
opening a cache whose stored key differs is refused with a message naming the fields that changed
(no silently stale embeddings). Each shard is written to a temporary name and renamed, then the
index is rewritten (atomically too), so a killed run leaves only complete shards listed; reopening
with the same key resumes: :meth:`EmbeddingCache.missing` lists what is left, and since shard
boundaries depend only on the write order and ``shard_size``, a resumed run writes byte-identical
shards. Reads stream: :meth:`get` opens one tensor of one shard, iteration holds one shard at a time.

Rank-sharded writing (torchrun): :meth:`plan` cuts the missing ids into shards of ``shard_size``
consecutive images numbered after the indexed ones, the same plan on every rank and for any world
size; rank ``r`` of ``W`` writes shards ``r, r + W, ...`` with :meth:`write_shard` (atomically, no
index), then rank 0 lists them all with :meth:`finish`. A shard's file records the key hash and its
number, so :meth:`shard_done` recognises a finished shard of a killed run that no index lists yet.
The index records only the key, dtype, shard size and each shard's file, ids (plan order), rows and
sha256, nothing about the run, so a cache written by 2 ranks is byte-identical to one process's.

>>> cache = EmbeddingCache(root, {"teacher": t.fingerprint, "proposals": phash}, dtype="fp16")
>>> for iid in cache.missing(all_ids): cache.write([iid], [emb_of(iid)])
>>> cache.close()                       # flushes the last shard, marks the cache complete
>>> cache.get(42)                       # (N, D) float32
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from distill.errors import DistillError
from distill.files import atomic_path, read_json, sha256_file, sha256_json, write_json

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def _save_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


class EmbeddingCache:
    """Sharded safetensors embedding cache keyed by ``key`` (a json-able dict).

    Args:
        root: the cache folder.
        key: what produced the embeddings; a stored cache with another key is refused.
        dtype: ``fp16`` or ``fp32`` storage (reads return float32).
        shard_size: images per shard.
        readonly: open an existing cache for reading only (it must exist and match ``key``).
    """

    def __init__(self, root: str | os.PathLike, key: dict, dtype: str = "fp16", shard_size: int = 256, readonly: bool = False) -> None:
        if dtype not in DTYPES:
            raise DistillError(f"teacher.cache_dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        if shard_size < 1:
            raise DistillError(f"regions.shard_size: expected >= 1, got {shard_size}")
        self.root = Path(root)
        self.key = dict(key, dtype=dtype)
        self.key_hash = sha256_json(self.key)[:16]
        self.dtype = dtype
        self.shard_size = shard_size
        self.readonly = readonly
        self._buf_ids: list[int] = []
        self._buf: list[torch.Tensor] = []
        idx_path = self.root / "index.json"
        if idx_path.is_file():
            index = read_json(idx_path, "embedding cache index")
            self._check_key(index)
            self.index = index
        elif readonly:
            raise DistillError(f"{self.root}: no embedding cache here (index.json missing); build it first")
        else:
            self.index = {"key": self.key, "key_hash": self.key_hash, "dtype": dtype, "shard_size": shard_size, "complete": False, "shards": []}
        self._where = {int(i): s for s, sh in enumerate(self.index["shards"]) for i in sh["image_ids"]}

    # ------------------------------------------------------------------------------- key check
    def _check_key(self, index: dict) -> None:
        old = index.get("key", {})
        if old == self.key:
            if index.get("shard_size") != self.shard_size and not self.readonly:
                self.shard_size = int(index.get("shard_size", self.shard_size))  # keep the stored layout
            return
        fields = sorted(set(old) | set(self.key))
        diff = [f"{f}: {str(old.get(f, '<absent>'))[:24]} -> {str(self.key.get(f, '<absent>'))[:24]}" for f in fields if old.get(f) != self.key.get(f)]
        raise DistillError(
            f"{self.root}: stale embedding cache, built from other inputs ({'; '.join(diff)}); "
            "delete this folder or use another cache root to rebuild it"
        )

    # ------------------------------------------------------------------------------- writing
    def missing(self, image_ids: Iterable[int]) -> list[int]:
        """The ids of ``image_ids`` not yet in a written shard (in the given order)."""
        return [int(i) for i in image_ids if int(i) not in self._where]

    def write(self, image_ids: Sequence[int], tensors: Sequence[torch.Tensor]) -> None:
        """Add one tensor per image; a shard is written whenever ``shard_size`` images are buffered."""
        if self.readonly:
            raise DistillError(f"{self.root}: cache opened read-only")
        if len(image_ids) != len(tensors):
            raise DistillError(f"cache.write: {len(image_ids)} image ids for {len(tensors)} tensors")
        for iid, t in zip(image_ids, tensors):
            iid = int(iid)
            if iid in self._where or iid in self._buf_ids:
                raise DistillError(f"{self.root}: image id {iid} written twice")
            self._buf_ids.append(iid)
            self._buf.append(self._stored(iid, t))
            if len(self._buf_ids) >= self.shard_size:
                self.flush()

    def _stored(self, iid: int, t: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(t).all():
            raise DistillError(f"cache.write: embeddings of image {iid} contain NaN/inf")
        return t.detach().to("cpu", DTYPES[self.dtype]).contiguous()

    def flush(self) -> None:
        """Write the buffered images as one shard (atomically), then the index."""
        if not self._buf_ids:
            return
        entry = self.write_shard(len(self.index["shards"]), self._buf_ids, self._buf)
        self._buf_ids, self._buf = [], []
        self.add_shards([entry])

    # ------------------------------------------------------------------------------- sharded writing
    @staticmethod
    def shard_file(k: int) -> str:
        return f"shard-{k:05d}.safetensors"

    def _shard_tag(self, k: int) -> str:
        return f"key_hash={self.key_hash};shard={k}"

    def plan(self, image_ids: Iterable[int]) -> list[tuple[int, list[int]]]:
        """The shards still to write for ``image_ids``: ``(shard number, ids)``, consecutive runs of
        ``shard_size`` of the missing ids (in the given order), numbered after the indexed shards.

        It depends only on the index and ``image_ids``, so every rank computes the same plan, a
        resumed run the plan of the killed one, and one process writes the same shards as
        :meth:`write` + :meth:`close` would."""
        todo = self.missing(image_ids)
        k0 = len(self.index["shards"])
        S = self.shard_size
        return [(k0 + j, todo[a : a + S]) for j, a in enumerate(range(0, len(todo), S))]

    def write_shard(self, k: int, image_ids: Sequence[int], tensors: Sequence[torch.Tensor]) -> dict:
        """Write shard ``k`` of :meth:`plan` (atomically) without touching the index; returns its
        index entry (for :meth:`add_shards`)."""
        if self.readonly:
            raise DistillError(f"{self.root}: cache opened read-only")
        if len(image_ids) != len(tensors):
            raise DistillError(f"cache.write: {len(image_ids)} image ids for {len(tensors)} tensors")
        ids = [int(i) for i in image_ids]
        if len(set(ids)) != len(ids) or any(i in self._where for i in ids):
            raise DistillError(f"{self.root}: shard {k}: an image id is written twice")
        stored = [self._stored(i, t) for i, t in zip(ids, tensors)]
        name = self.shard_file(k)
        # one metadata entry: safetensors stores metadata in a hash map, so several entries would
        # not have a stable order (and shards would not be byte-identical across runs)
        _save_shard({str(i): t for i, t in zip(ids, stored)}, self.root / name, {"distill": self._shard_tag(k)})
        rows = int(sum(t.shape[0] if t.ndim else 1 for t in stored))
        return {"file": name, "image_ids": ids, "rows": rows, "sha256": sha256_file(self.root / name)}

    def shard_done(self, k: int, image_ids: Sequence[int]) -> dict | None:
        """The index entry of shard ``k`` when its file is already on disk, written under this key
        as shard ``k`` with exactly ``image_ids`` (a finished shard of an interrupted run, maybe
        another rank's); None when it is absent, unreadable or from other inputs."""
        from safetensors import safe_open

        path = self.root / self.shard_file(k)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("distill") != self._shard_tag(k):
                    return None
                if set(f.keys()) != {str(int(i)) for i in image_ids} or len(set(image_ids)) != len(image_ids):
                    return None
                shapes = [f.get_slice(str(int(i))).get_shape() for i in image_ids]
        except Exception:  # noqa: BLE001 - a damaged file is simply not finished
            return None
        rows = int(sum(s[0] if len(s) else 1 for s in shapes))
        return {"file": path.name, "image_ids": [int(i) for i in image_ids], "rows": rows, "sha256": sha256_file(path)}

    def add_shards(self, entries: Sequence[dict], complete: bool = False) -> None:
        """List written shards (in shard order) in the index and rewrite it (atomically);
        ``complete`` also marks the cache complete."""
        n = len(self.index["shards"])
        for j, entry in enumerate(entries):
            if entry["file"] != self.shard_file(n + j):
                raise DistillError(f"{self.root}: shard {entry['file']} listed out of order (expected {self.shard_file(n + j)})")
        for entry in entries:
            k = len(self.index["shards"])
            self.index["shards"].append(entry)
            for i in entry["image_ids"]:
                self._where[int(i)] = k
        if complete:
            self.index["complete"] = True
        self._write_index()

    def finish(self, plan: Sequence[tuple[int, Sequence[int]]], written: dict[int, dict] | None = None) -> None:
        """After every rank wrote its shards of ``plan``: list them all and mark the cache complete
        (rank 0 only). ``written`` maps shard numbers to the entries this process already has."""
        written = written or {}
        entries = []
        for k, ids in plan:
            if k < len(self.index["shards"]):
                continue  # listed already (one process lists each shard as it is written)
            entry = written.get(k) or self.shard_done(k, ids)
            if entry is None:
                raise DistillError(f"{self.root / self.shard_file(k)}: shard missing or stale after every rank finished; rerun the same command to finish (finished shards are kept)")
            entries.append(entry)
        self.add_shards(entries, complete=True)

    def refresh(self) -> None:
        """Re-read the index written by another process (rank 0 after :meth:`finish`)."""
        idx_path = self.root / "index.json"
        if not idx_path.is_file():
            raise DistillError(f"{self.root}: no embedding cache index after rank 0 finished it")
        index = read_json(idx_path, "embedding cache index")
        self._check_key(index)
        self.index = index
        self._where = {int(i): s for s, sh in enumerate(self.index["shards"]) for i in sh["image_ids"]}

    def _write_index(self) -> None:
        write_json(self.root / "index.json", self.index)

    def close(self) -> None:
        """Flush the last shard and mark the cache complete."""
        if self.readonly:
            return
        self.flush()
        self.index["complete"] = True
        self._write_index()

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        # on an exception: keep the complete shards, drop the buffer (a resumed run redoes it)

    # ------------------------------------------------------------------------------- reading
    @property
    def complete(self) -> bool:
        return bool(self.index.get("complete"))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._where

    def image_ids(self) -> list[int]:
        return [int(i) for sh in self.index["shards"] for i in sh["image_ids"]]

    def get(self, image_id: int) -> torch.Tensor:
        """The embeddings of one image, float32 (reads only that tensor from its shard)."""
        from safetensors import safe_open

        iid = int(image_id)
        if iid not in self._where:
            raise DistillError(f"{self.root}: image id {iid} is not in the embedding cache")
        path = self.root / self.index["shards"][self._where[iid]]["file"]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(str(iid)).float()

    def iter_shards(self) -> Iterator[dict[int, torch.Tensor]]:
        """One shard at a time: {image_id: tensor float32}."""
        from safetensors.torch import load_file

        for sh in self.index["shards"]:
            path = self.root / sh["file"]
            if not path.is_file():
                raise DistillError(f"{path}: shard listed in index.json is missing (delete {self.root} to rebuild)")
            data = load_file(str(path))
            yield {int(i): data[str(i)].float() for i in sh["image_ids"]}

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for shard in self.iter_shards():
            yield from shard.items()

    def verify(self) -> None:
        """Check every shard's sha256 against the index (DistillError naming the first bad one)."""
        for sh in self.index["shards"]:
            path = self.root / sh["file"]
            if not path.is_file() or sha256_file(path) != sh["sha256"]:
                raise DistillError(f"{path}: shard missing or corrupt (sha256 differs from index.json); delete {self.root} to rebuild")
