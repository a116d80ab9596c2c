"""DDP through the engine on CPU (gloo): 2 ranks == 1 process with the same total batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from distill.engine.distributed import ResumableSampler


class Toy(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 4, 4, generator=g)
        self.y = torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"y": self.y[i], "image_id": i}


def collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(48, 2)

    def forward(self, x, targets):
        y = torch.stack([t["y"] for t in targets])
        return {"loss_a": ((self.l(x.flatten(1)) - y) ** 2).mean()}


def host_store() -> torch.distributed.TCPStore:
    """The rendezvous store, served by THIS process on a port the OS picks when binding it (port 0):
    no window in which another program can take the port (a "find a free port, close it, hand it
    on" helper has one). The workers join it as torchrun's workers join their agent's store:
    ``TORCHELASTIC_USE_AGENT_STORE=True`` makes every rank a client of MASTER_ADDR:MASTER_PORT."""
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)


def _worker(rank: int, world: int, port: int, out_dir: str, q) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    torch.set_num_threads(1)
    from distill.config import TrainConfig
    from distill.engine import distributed as dl
    from distill.engine.train import make_loader, train

    try:
        dl.init_distributed("cpu")
        cfg = TrainConfig(max_steps=3, batch_size=4, lr=0.1, warmup=0, checkpoint_period=0, log_period=1, seed=3, device="cpu")
        torch.manual_seed(0)
        m = Lin()
        train(m, make_loader(Toy(), cfg, collate), cfg, out_dir, progress=False)
        q.put((rank, m.l.weight.detach().tolist(), sorted(os.listdir(out_dir))))
        # both ranks done before the group is torn down: without it a rank aborted at exit once
        # under a busy CPU ("terminate called without an active exception", exit code -6)
        torch.distributed.barrier()
    finally:
        dl.cleanup()


def test_sampler_shards_are_disjoint_and_deterministic():
    a = [list(ResumableSampler(10, seed=1, rank=r, world=2)) for r in range(2)]
    assert len(a[0]) == len(a[1]) == 5 and not set(a[0]) & set(a[1])
    s = ResumableSampler(10, seed=1, rank=0, world=1)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3)
    s.set_start(4)
    assert list(s) == full[4:]
    s.set_epoch(4)
    assert list(s) != full


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    from distill.config import TrainConfig
    from distill.engine.train import make_loader, train

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = host_store()  # held (bound) until the test ends
    port = store.port
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path / "ddp"), q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (torch.tensor(w), files)) for r, w, files in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    cfg = TrainConfig(max_steps=3, batch_size=4, lr=0.1, warmup=0, checkpoint_period=0, log_period=1, seed=3, device="cpu")
    torch.manual_seed(0)
    m = Lin()
    train(m, make_loader(Toy(), cfg, collate), cfg, tmp_path / "single", progress=False)
    torch.testing.assert_close(got[0][0], got[1][0], rtol=0, atol=0)  # ranks stay in sync
    torch.testing.assert_close(got[0][0], m.l.weight.detach(), rtol=1e-5, atol=1e-6)
    assert "model_final.pt" in got[0][1]
