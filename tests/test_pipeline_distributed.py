"""Two gloo processes: rank utilities, and MIL-NCE / GDT / Sinkhorn-Knopp / relabelling equal to one process on
the concatenated batch (losses, DDP-averaged gradients, labels)."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import distributed as D
from pipeline.losses import SelfLabelConfig
from pipeline.losses.gdt import gdt_loss
from pipeline.losses.milnce import milnce_loss
from pipeline.losses.selflabel import SelfLabelling
from pipeline.losses.sinkhorn import sinkhorn, sinkhorn_knopp

pytestmark = pytest.mark.distributed
WORLD, B, K, DIN, D_OUT = 2, 3, 2, 5, 4
SL_CFG = dict(heads=2, clusters=4, marginals="zipf", align_modalities=True)


def make_inputs():
    g = torch.Generator().manual_seed(7)
    return {
        "proj": torch.randn(DIN, D_OUT, generator=g, dtype=torch.float64),
        "video": torch.randn(WORLD * B, 4, DIN, generator=g, dtype=torch.float64),
        "audio": torch.randn(WORLD * B, 4, DIN, generator=g, dtype=torch.float64),
        "text": torch.randn(WORLD * B, K, DIN, generator=g, dtype=torch.float64),
        "mask": torch.rand(WORLD * B, K, generator=g) > 0.3,
        "has_audio": torch.tensor([True, True, False, True, True, True]),
        "scores": torch.log_softmax(torch.randn(9 + 14, 6, generator=g, dtype=torch.float64) * 2, 1),
        "vlogp": torch.log_softmax(torch.randn(20, 2, 4, generator=g), -1),
        "alogp": torch.log_softmax(torch.randn(20, 2, 4, generator=g), -1),
        "idx": torch.randperm(20, generator=g),
        "sharp": torch.log_softmax(torch.randn(400, 8, generator=g, dtype=torch.float64) * 2, 1),  # relaxation on
    }


def compute(x, rows=slice(None)):
    """Losses and their gradients w.r.t. a shared projection (what DDP averages); rows = this rank's batch."""
    results = {}
    for name in ("milnce", "gdt1", "gdt3", "gdt9"):
        proj = x["proj"].clone().requires_grad_(True)
        if name == "milnce":
            loss = milnce_loss(x["video"][rows, 0] @ proj, x["text"][rows] @ proj, x["mask"][rows])
        else:
            loss = gdt_loss(x["video"][rows] @ proj, x["audio"][rows] @ proj, int(name[3:]), valid=x["has_audio"][rows])
        loss.backward()
        results[name] = loss.detach()
        results[name + "/grad"] = D.all_reduce_mean(proj.grad)  # DDP's gradient average
    return results


def relabel(x, rows):
    sl = SelfLabelling(SelfLabelConfig(**SL_CFG), num_samples=20)
    sl.relabel(x["vlogp"][rows], x["alogp"][rows], x["idx"][rows])
    return sl


def worker(rank, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x = make_inputs()
        res = compute(x, slice(rank * B, (rank + 1) * B))
        res["rank"], res["world"], res["main"] = (
            torch.tensor(D.rank()),
            torch.tensor(D.world_size()),
            torch.tensor(D.is_main()),
        )
        res["varlen"] = D.all_gather_varlen(torch.arange(rank + 2))  # 2 rows on rank 0, 3 on rank 1
        res["any_rank"] = torch.tensor(D.any_rank(rank == 1, False, rank == 0))
        counts = D.sum_counts({"video_decode": 2, "no_captions": 1} if rank == 0 else {"video_decode": 3})
        res["counts"] = torch.tensor([counts["video_decode"], counts["no_captions"], len(counts)])
        sk_rows = slice(0, 9) if rank == 0 else slice(9, 23)  # uneven rows per rank
        res["sk"] = D.all_gather_varlen(sinkhorn_knopp(x["scores"][sk_rows], 20.0, distributed=True, tol=1e-3))
        sharp = sinkhorn(x["sharp"][:150] if rank == 0 else x["sharp"][150:], 20.0, distributed=True, tol=1e-3)
        res["sharp"] = D.all_gather_varlen(sharp.labels)
        res["sharp/steps"] = torch.tensor([sharp.iterations, sharp.relax], dtype=torch.float64)
        sl = relabel(x, slice(0, 12) if rank == 0 else slice(12, 20))
        res["labels"], res["audio_perm"] = sl.labels, sl.audio_perm
        D.barrier()
        torch.save(res, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "res"
    ctx = mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process gloo test did not finish in 120 s")
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]


def test_rank_utilities(two_ranks):
    assert [int(r["rank"]) for r in two_ranks] == [0, 1]
    assert all(int(r["world"]) == 2 for r in two_ranks) and [bool(r["main"]) for r in two_ranks] == [True, False]
    assert two_ranks[0]["varlen"].tolist() == [0, 1, 0, 1, 2]
    for r in two_ranks:  # the same answers on every rank
        assert r["any_rank"].tolist() == [True, False, True]
        assert r["counts"].tolist() == [5, 1, 2]
    assert D.any_rank(True, False) == (True, False) and D.sum_counts({"a": 1}) == {"a": 1}  # one process
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main()  # this process: not initialised
    assert torch.equal(D.all_gather_with_grad(torch.ones(2)), torch.ones(2))


@pytest.mark.parametrize("name", ["milnce", "gdt1", "gdt3", "gdt9"])
def test_losses_and_averaged_gradients_equal_one_process(two_ranks, name):
    single = compute(make_inputs())
    for res in two_ranks:
        torch.testing.assert_close(res[name], single[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res[name + "/grad"], single[name + "/grad"], rtol=1e-9, atol=1e-12)


def test_sinkhorn_and_relabel_equal_one_process(two_ranks):
    x = make_inputs()
    assert torch.equal(two_ranks[0]["sk"], sinkhorn_knopp(x["scores"], 20.0, tol=1e-3))
    sharp = sinkhorn(x["sharp"], 20.0, tol=1e-3)  # over-relaxed: every rank must take the same decisions
    assert sharp.relax > 1
    assert torch.equal(two_ranks[0]["sharp/steps"], two_ranks[1]["sharp/steps"])
    assert two_ranks[0]["sharp/steps"].tolist() == pytest.approx([sharp.iterations, sharp.relax], rel=1e-12)
    for res in two_ranks:
        assert torch.equal(res["sharp"], sharp.labels)
    sl = relabel(x, slice(None))
    for res in two_ranks:
        assert torch.equal(res["labels"], sl.labels)
        assert torch.equal(res["audio_perm"], sl.audio_perm)
