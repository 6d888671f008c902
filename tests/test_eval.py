"""The kNN monitor with a sharded memory bank (common.py section 6): 2 gloo processes give what 1 process gives, the
cross-rank top-k merge at a closed-form answer, and padding rows of uneven shards never become neighbours.

Features come from a flatten "backbone" on in-memory images: exact per image, so every configuration stores the same
fp16 bank and the only difference between 1 and 2 processes is the summation order of fp32 dot products."""
import math, os, types

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import EPS32, free_port, run_cli

CPU = torch.device("cpu")
FLAT = nn.Flatten()
D, K_SIZES = 48, (5, 10, 20)   # 3 x 4 x 4 images; k below, between and above the shard sizes (6 and 7 rows)


def random_data(seed=0, n=13, q=9, classes=4):
    """n = 13 training images: shards of 6 and 7 on 2 ranks, each padded to 7 for the gather."""
    g = torch.Generator().manual_seed(seed)
    image = lambda m: torch.randint(0, 256, (m, 3, 4, 4), generator=g, dtype=torch.uint8)
    train = common.Source(torch.randint(0, classes, (n,), generator=g), image(n))
    val = common.Source(torch.randint(0, classes, (q,), generator=g), image(q))
    return common.Data(train, train, val, (0.5,) * 3, (0.25,) * 3)


def features(source, data, shard):
    return common.extract_features(FLAT, source, 4, data.mean, data.std, CPU, shard=shard, dtype=torch.float16)


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# Closed form: six bank rows, each its own class, so the ranked classes are the neighbours in order of similarity
# (zero-vote classes follow by index). Rows 0-2 live on rank 0, rows 3-5 on rank 1: the nearest rows alternate ranks.
BANK_DEG = [0, 50, 100, 20, 70, 150]
QUERY_DEG = [33, 88, 140]
# By angular distance. The closest gap, 4 degrees, is 0.018 in cosine: far above fp16 rounding of the bank (5e-4).
NEAREST = [[3, 1, 0, 4, 2], [2, 4, 1, 5, 3], [5, 2, 4, 1, 3]]


def scenarios():
    """Everything the tests compare, computed in this process's world (1 process, or this rank of 2)."""
    out = {}
    data = random_data()
    bank, queries = features(data.knn_train, data, True), features(data.knn_val, data, False)
    bank_y = data.knn_train.labels[common.shard_rows(len(data.knn_train))]
    for k in K_SIZES:  # tiny chunks: the running top-k crosses bank chunks and query chunks
        out[f"ranked_k{k}"] = common.knn_classify(bank, bank_y, queries, 4, k, query_chunk=4, bank_chunk=5)
    out["bank"], out["queries"] = bank, queries
    out["knn_eval"] = torch.tensor(common.knn_eval(FLAT, data, types.SimpleNamespace(device=CPU, workers=0), 4))
    # closed form, bank in fp16 as knn_eval stores it
    rows = common.shard_rows(len(BANK_DEG))
    angles = torch.tensor([unit(a) for a in BANK_DEG], dtype=torch.float16)[rows]
    queries = torch.tensor([unit(a) for a in QUERY_DEG])
    for k in (3, 8):  # 8 > 6 rows: every rank pads its candidates with -inf
        out[f"closed_k{k}"] = common.knn_classify(angles, torch.arange(6)[rows], queries, 8, k)
    # padding: 5 images on 2 ranks, rank 0 holds rows 0-1 and embeds row 4 again to fill its gather buffer. Image i
    # is class 3 + i and the query is image 4: a kept copy of row 4 would push a row out of the top 5, and its class
    # behind the zero-vote classes 0-2
    pad = random_data(seed=1, n=5, q=1)
    pad = pad._replace(knn_train=common.Source(torch.arange(3, 8), pad.knn_train.images),
                       knn_val=common.Source(torch.tensor([7]), pad.knn_train.images[4:]))
    shard = features(pad.knn_train, pad, True)
    out["pad_shard"], out["pad_gathered"] = shard, features(pad.knn_train, pad, False)
    out["pad_ranked"] = common.knn_classify(shard, pad.knn_train.labels[common.shard_rows(5)],
                                            features(pad.knn_val, pad, False), 8, k=5)
    # n = 1 < world: rank 0's shard is empty
    one = pad._replace(knn_train=pad.knn_train.subset(1))
    one_bank, one_y = features(one.knn_train, one, True), one.knn_train.labels[common.shard_rows(1)]
    out["one_ranked"] = common.knn_classify(one_bank, one_y, features(one.knn_val, one, False), 8)
    return out


def _two_ranks(rank, port, path):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.save(scenarios(), os.path.join(path, f"rank{rank}.pth"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one process, [rank 0 of two, rank 1 of two])"""
    path = tmp_path_factory.mktemp("eval")
    torch.multiprocessing.spawn(_two_ranks, args=(free_port(), str(path)), nprocs=2)
    return scenarios(), [torch.load(path / f"rank{r}.pth") for r in range(2)]


def reference(bank, y, queries, classes, k, T=0.07):
    """Unsharded weighted kNN in fp64 on the same fp16 features -> (ranked Q x 5, similarities Q x N, votes Q x C)."""
    sim = F.normalize(queries.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
    s, i = sim.topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(sim), classes, dtype=torch.float64).scatter_add_(1, y[i], (s / T).exp())
    return votes.argsort(dim=1, descending=True, stable=True)[:, :5], sim, votes


def test_sharded_knn_equals_one_process_and_reference(runs):
    one, two = runs
    data = random_data()
    assert [len(t["bank"]) for t in two] == [6, 7]   # uneven shards, without their padding row
    assert torch.equal(torch.cat([t["bank"] for t in two]), one["bank"]) and one["bank"].dtype == torch.float16
    assert all(torch.equal(t["queries"], one["queries"]) for t in two)   # gathered in index order
    # fp32 dot products of 48 terms in another order differ by at most 48 eps32 of a unit-scale result; near-ties of
    # that size (a neighbour at rank k vs k + 1, or two classes' votes) could flip, so the data must have none.
    tol = D * EPS32
    for k in K_SIZES:
        want, sim, votes = reference(one["bank"], data.knn_train.labels, one["queries"], 4, k)
        s = sim.sort(dim=1, descending=True).values
        if k < len(s[0]):
            assert (s[:, k - 1] - s[:, k]).min() > 4 * tol
        voted = [v[v > 0] for v in votes.sort(dim=1, descending=True).values]   # zero votes tie exactly everywhere
        assert min(((v[:-1] - v[1:]) / v[0]).min().item() for v in voted if len(v) > 1) > 4 * tol / 0.07
        assert torch.equal(one[f"ranked_k{k}"], want), k
        assert all(torch.equal(t[f"ranked_k{k}"], want) for t in two), k   # the same answer on every rank
    assert all(torch.equal(t["knn_eval"], one["knn_eval"]) for t in two)


def test_merge_at_closed_form(runs):
    one, two = runs
    for res in (one, *two):
        assert res["closed_k3"].tolist() == [n[:3] + sorted(set(range(8)) - set(n[:3]))[:2] for n in NEAREST]
        assert res["closed_k8"].tolist() == NEAREST   # all six rows vote, the -inf candidates weigh 0


def test_padding_rows_never_neighbours(runs):
    one, two = runs
    assert [len(t["pad_shard"]) for t in two] == [2, 3]   # rank 0's buffer held 3 rows, the third a copy of row 4
    assert torch.equal(torch.cat([t["pad_shard"] for t in two]), one["pad_shard"])
    assert all(torch.equal(t["pad_gathered"], one["pad_gathered"]) for t in two)   # gathered without the copy
    for res in (one, *two):
        ranked = res["pad_ranked"][0].tolist()
        assert ranked[0] == 7 and sorted(ranked) == [3, 4, 5, 6, 7]   # the query's own image first, every row once
    for res in (one, *two):   # one image, on rank 1 only: its class, then the zero-vote classes by index
        assert res["one_ranked"].tolist() == [[3, 0, 1, 2, 4]]


def test_linear_eval_precompute_two_processes(tmp_path):
    """linear_eval.py through torchrun: each rank keeps an fp16 shard of the training features; the kNN is the one
    process's, and the probe trains on the shards with DDP."""
    torch.manual_seed(0)
    path = str(tmp_path / "backbone.pth")
    common.export_backbone(common.build_backbone("resnet18", "imagenet"), path, method="x", dataset="synthetic",
                           epoch=0)
    args = [path, "--dataset", "synthetic", "--subset", "101", "--epochs", "2", "--precompute", "--batch-size", "32",
            "--gpus", "0"]
    one, two = (run_cli("linear_eval.py", *args, nproc=n) for n in (1, 2))
    assert one.rc == 0 and two.rc == 0, one.err[-2000:] + two.err[-2000:]
    a, b = one.json["runs"][path], two.json["runs"][path]
    assert (a["knn_top1"], a["knn_top5"]) == (b["knn_top1"], b["knn_top5"])
    assert all(0 <= r["linear_top1"] <= r["linear_top5"] <= 100 for r in (a, b))
