"""CLIM (clim.py, the authors' recipe): the loss at closed-form values, the per-batch CutMix, PCA-whitening and
k-means against closed-form cases, the eligibility rule, the positive draw (uniform, independent of file order),
the checkpointed cluster tables, the --baseline / --ablation mr arms, and the CLI end to end."""
import math, os, random, types

import matplotlib.image as mpimg
import pytest
import torch
import torch.nn as nn

import clim
import common
from conftest import EPS32, TINY, assert_same_update, free_port, last_step_both_ways, run_cli, without

e = torch.eye(3)


# ---------------------------------------------------------------- the loss

@pytest.mark.parametrize("lam", [1.0, 0.5, 0.25])
def test_loss_over_four_pairings_closed_form(lam):
    """Two resolutions, tau 1: queries e1 (r=1), e2 (r=2); anchor keys e1, e2; positive keys e2, e1; queues {-e1},
    {-e2}. Each term is log(1 + sum_n e^{u.Q_n - u.v}): the anchor terms sum to 2 log(1 + e^-2) + 2 log 2, the
    positive terms to 4 log(1 + e^-1), and L = (lam A + (1 - lam) P) / 4."""
    A = 2 * math.log(1 + math.exp(-2)) + 2 * math.log(2)
    P = 4 * math.log(1 + math.exp(-1))
    loss = clim.clim_loss([e[None, 0], e[None, 1]], [e[None, 0], e[None, 1]], [e[None, 1], e[None, 0]],
                          torch.tensor(lam), [-e[None, 0], -e[None, 1]], 1.0)
    assert loss.item() == pytest.approx((lam * A + (1 - lam) * P) / 4, rel=1e-6)
    assert {1.0: 0.410038, 0.5: 0.361650, 0.25: 0.337456}[lam] == pytest.approx(loss.item(), abs=1e-6)


# ---------------------------------------------------------------- the mixture

def draw(u, lam0, cy, cx):
    return {"mix_u": torch.tensor([u]), "mix_lam0": torch.tensor([lam0]), "mix_centre": torch.tensor([[cy, cx]])}


def test_cutmix_box_is_the_authors_rand_bbox():
    # lam0 0.75: cut = floor(224 * 0.5) = 112 around the centre 112: [56, 168) on both axes
    assert [int(t) for t in clim.cutmix_box(224, torch.tensor(0.75), torch.tensor([0.5, 0.5]))] == [56, 56, 168, 168]
    # the same relative box at 160 px: cut 80 around 80
    assert [int(t) for t in clim.cutmix_box(160, torch.tensor(0.75), torch.tensor([0.5, 0.5]))] == [40, 40, 120, 120]
    # a box at the corner is clipped: [0, 56) -> the anchor keeps 1 - 56^2 / 224^2 = 0.9375
    assert [int(t) for t in clim.cutmix_box(224, torch.tensor(0.75), torch.tensor([0.0, 0.0]))] == [0, 0, 56, 56]


def test_mix_queries_pastes_one_box_per_batch():
    q = [torch.zeros(3, 3, 32, 32), torch.zeros(3, 3, 16, 16)]
    p = [torch.ones(3, 3, 32, 32), torch.ones(3, 3, 16, 16)]
    mixed, lam, on = clim.mix_queries(q, p, draw(0.1, 0.75, 0.0, 0.0), "cutmix", prob=0.8)
    assert on and lam.item() == 1 - 8 * 8 / 32 ** 2                           # cut 16 at the corner: 8 x 8 pasted
    assert mixed[0][:, :, :8, :8].eq(1).all() and mixed[0].sum() == 3 * 3 * 64   # the same box for every sample
    assert mixed[1][:, :, :4, :4].eq(1).all() and mixed[1].sum() == 3 * 3 * 16   # scaled to 16 px
    mixed, lam, on = clim.mix_queries(q, p, draw(0.9, 0.75, 0.0, 0.0), "cutmix", prob=0.8)
    assert not on and lam.item() == 1 and all(m.eq(0).all() for m in mixed)   # 20 %: plain queries
    mixed, lam, on = clim.mix_queries(q, p, draw(0.1, 0.3, 0.5, 0.5), "mixup", prob=0.8)
    assert lam.item() == pytest.approx(0.3) and torch.allclose(mixed[0], torch.full_like(q[0], 0.7))


# ---------------------------------------------------------------- clustering: closed-form cases

def test_pca_whitening_equalises_the_principal_directions():
    """Points +-s_i v_i (orthonormal v, s = 3, 2, 1) plus an offset: the covariance is sum s_i^2 / 3 v_i v_i^T, so
    whitening to 2 dims maps +-s_1 v_1 to +-(sqrt 3, 0) and +-s_2 v_2 to (0, +-sqrt 3) whatever their scale; after L2
    normalisation they are unit axis vectors. (+-v_3, dropped, projects to rounding noise, which normalisation
    blows up to unit length as faiss's would: not compared.)"""
    v = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0].T
    x = torch.stack([sign * s * v[i] for i, s in enumerate([3.0, 2.0, 1.0]) for sign in (1, -1)]).float()
    y = clim.pca_whiten(x + torch.tensor([5.0, -2.0, 1.0]), dim=2, eps=0)
    want = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])
    assert torch.allclose(y[:4].abs(), want, atol=1e-5) and y[0, 0] == -y[1, 0] and y[2, 1] == -y[3, 1]


def test_kmeans_closed_form_and_blobs():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    centres, a, d2 = clim.kmeans(x, 2, iters=5, seed=0, n=4)
    assert sorted(centres.flatten().tolist()) == [0.5, 10.5] and a[0] == a[1] != a[2] == a[3]
    assert torch.allclose(d2, torch.full((4,), 0.25))                           # squared L2 to the centroid
    g = torch.Generator().manual_seed(1)
    blobs = torch.cat([c + 0.05 * torch.randn(30, 3, generator=g) for c in e])
    _, a, _ = clim.kmeans(blobs, 3, iters=30, seed=3, n=90)
    assert all(len(set(a[i * 30:(i + 1) * 30].tolist())) == 1 for i in range(3)) and len(set(a.tolist())) == 3
    same = clim.kmeans(blobs, 3, iters=30, seed=3, n=90)
    assert torch.equal(same[1], a)                                              # seeded: deterministic
    dup = torch.tensor([[0.0], [0.0], [0.0], [10.0]])                           # two initial centres coincide
    centres, a, _ = clim.kmeans(dup, 3, iters=3, seed=0, n=4)
    assert torch.isfinite(centres).all()


def test_eligible_is_at_most_the_cluster_mean():
    assign = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    d2 = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 4.0, 4.0])                     # cluster means 3, 5, 4
    assert clim.eligible(assign, d2, 3).tolist() == [True, True, True, False, True, True, True]


# ---------------------------------------------------------------- the positive draw

def draws(assign, ok, k, index, n=400):
    members, offsets = clim.positive_tables(assign, ok, k)
    sampler = clim.PositiveSampler(assign.int(), members, offsets)
    return [sampler(index, random.Random(s))[-1] for s in range(n)]


def test_positive_is_uniform_over_the_eligible_members_of_the_cluster():
    assign = torch.tensor([1, 0, 1, 1, 0, 1])
    ok = torch.tensor([True, True, False, True, True, True])
    seen = draws(assign, ok, 2, 2)
    assert set(seen) == {0, 3, 5} and min(seen.count(j) for j in (0, 3, 5)) > 100  # 400 draws, 1/3 each
    members, offsets = clim.positive_tables(torch.tensor([0, 0]), torch.tensor([True, False]), 1)
    sampler = clim.PositiveSampler(torch.full((2,), -1, dtype=torch.int32), members, offsets)
    assert sampler(1, random.Random(0)) == [1]                                   # before the first clustering


def window_positive(assign, ok, index, rng, width=50):
    """The authors' get_sample_of_same_class: images listed by cluster, then by dataset index; draw list
    positions within +-50 of the anchor's until one is an eligible member of its cluster."""
    order = sorted(range(len(assign)), key=lambda i: (int(assign[i]), i))
    at = order.index(index)
    while True:
        j = rng.randint(at - width, at + width)
        if 0 <= j < len(order) and assign[order[j]] == assign[index] and ok[order[j]]:
            return order[j]


def test_positive_does_not_depend_on_file_order():
    """400 images of 4 classes in 2 clusters, listed class by class (an ImageFolder) or shuffled (same images). Our
    draw gives each image the same candidates, uniformly, in both orders; the authors' +-50 window does not: on the
    class-sorted list it picks the anchor's own class far more often (the label leak this test guards against)."""
    n, rng = 400, random.Random(0)
    label = torch.arange(n) // 100                                              # class-sorted files
    assign = label // 2                                                         # 2 clusters of 2 classes
    ok = torch.tensor([rng.random() < 0.6 for _ in range(n)])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))       # shuffled: position p holds perm[p]
    inv = torch.argsort(perm)
    for image in (0, 150, 399):
        sorted_draw = draws(assign, ok, 2, image)
        shuffled_draw = [int(perm[j]) for j in draws(assign[perm], ok[perm], 2, int(inv[image]))]
        cands = set(ok.nonzero().flatten()[(assign[ok] == assign[image])].tolist())
        assert set(sorted_draw) <= cands and set(shuffled_draw) <= cands
        members, offsets = clim.positive_tables(assign[perm], ok[perm], 2)
        c = int(assign[image])
        assert sorted(int(perm[j]) for j in members[offsets[c]:offsets[c + 1]]) == sorted(cands)
    same = lambda picks, anchors: sum(label[j] == label[i] for i, j in zip(anchors, picks)) / len(anchors)
    anchors = list(range(0, n, 7))
    ours_sorted = same([draws(assign, ok, 2, i, 1)[0] for i in anchors], anchors)
    window_sorted = same([window_positive(assign, ok, i, random.Random(i)) for i in anchors], anchors)
    window_shuffled = same([int(perm[window_positive(assign[perm], ok[perm], int(inv[i]), random.Random(i))])
                            for i in anchors], anchors)
    assert window_sorted > 0.9 and window_shuffled < 0.75 and ours_sorted < 0.75  # chance: 0.5 within a cluster


def test_persistent_workers_see_each_reclustering():
    n = 8
    cluster_of = torch.full((n,), -1, dtype=torch.int32).share_memory_()
    members = torch.full((n,), -1, dtype=torch.int32).share_memory_()
    offsets = torch.zeros(n + 1, dtype=torch.int32).share_memory_()
    sampler = clim.PositiveSampler(cluster_of, members, offsets)
    names = clim.view_names([8])
    src = common.Source([0] * n, images=torch.zeros(n, 3, 8, 8, dtype=torch.uint8))
    ds = common.ViewDataset(src, common.Views(clim.CLIMCrops(names), [8] * 4, [common.Recipe()] * 4, sampler), 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=n, num_workers=2, persistent_workers=True)
    first = next(iter(loader))["src"][:, names.index("pq8")]
    assign = torch.arange(n) // 2                                               # pairs (0, 1), (2, 3), ...
    ok = torch.arange(n) % 2 == 1                                               # only the odd one is eligible
    m, o = clim.positive_tables(assign, ok, n)
    cluster_of.copy_(assign)
    members.copy_(m)
    offsets.copy_(o)
    second = next(iter(loader))["src"][:, names.index("pq8")]                  # same workers, next epoch
    assert first.tolist() == list(range(n)) and second.tolist() == [i | 1 for i in range(n)]


# ---------------------------------------------------------------- the model

def small_model(positives=True, K=64):
    torch.manual_seed(0)
    return clim.CLIM(common.build_backbone("resnet18", "imagenet"), [16, 8], K, 0.2, 0.99, positives)


def fake_views(names, B=4):
    return [torch.randn(B, 3, int(n.lstrip("pqk")), int(n.lstrip("pqk")), generator=torch.Generator().manual_seed(i))
            for i, n in enumerate(names)]


def test_gradients_ema_and_two_queues():
    m = small_model()
    q0 = {k: v.clone() for k, v in m.encoder_q.state_dict().items()}
    k0 = {k: v.clone() for k, v in m.encoder_k.state_dict().items()}
    views = fake_views(m.names)
    loss, logs = m(views, draw(0.1, 0.5, 0.5, 0.5))
    loss.backward()
    assert torch.isfinite(loss) and set(logs) == {"lambda", "mixed"} and logs["mixed"] == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder_q.parameters())
    assert all(p.grad is None for p in m.encoder_k.parameters())
    assert [Q.ptr.item() for Q in m.queues] == [4, 4]                         # anchor keys only, one per resolution
    for name, p in m.encoder_k.named_parameters():                             # f_k = m f_k + (1 - m) f_q
        assert torch.allclose(p, 0.99 * k0[name] + 0.01 * q0[name], atol=1e-6), name


def test_unmixed_batch_is_multi_resolution_moco():
    """A batch drawn without mixing (u >= 0.8) gives the loss and the queues of --ablation mr on the anchor's views."""
    clim_m, mr = small_model(), small_model(positives=False)
    mr.load_state_dict(clim_m.state_dict())
    views = fake_views(clim_m.names)
    a, logs = clim_m(views, draw(0.95, 0.5, 0.5, 0.5))
    b, _ = mr(views[:4], {})
    assert logs["lambda"] == 1 and logs["mixed"] == 0 and mr.names == clim_m.names[:4]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert all(torch.allclose(x.queue, y.queue, atol=1e-6) for x, y in zip(clim_m.queues, mr.queues))


def build(extra):
    args = clim.parse(TINY + extra)
    args.device = torch.device("cpu")
    data = common.load_data(args)
    common.resolve_data(args, data)
    return args, data, clim.build(args, data)


def test_baseline_is_common_mocov2():
    args, _, setup = build(["--baseline"])
    assert type(setup.model) is common.MoCoV2 and setup.views.sizes == [32, 32] and setup.state is None
    assert args.method == "clim-baseline" and args.out.endswith("clim-baseline-synthetic")
    ref = common.MoCoV2(common.build_backbone("resnet18", "imagenet"), [512, 512, 128], args.queue_size, 0.2, 0.999)
    ref.load_state_dict(setup.model.state_dict())
    views = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    torch.manual_seed(5)
    a, _ = setup.model(views, {})
    torch.manual_seed(5)
    b, _ = ref(views)
    assert a.item() == b.item() and torch.equal(setup.model.queue.queue, ref.queue.queue)


def test_views_sizes_sources_and_the_mr_arm():
    args, data, s = build(["--clusters", "4"])
    assert s.views.sizes == [32, 23] * 4 and s.model.names == ["q32", "q23", "k32", "k23", "pq32", "pq23", "pk32",
                                                               "pk23"]
    cl = s.state
    cl.cluster_of.copy_(torch.arange(64) % 4)
    m, o = clim.positive_tables(torch.arange(64) % 4, torch.arange(64) == 9, 4)  # cluster 1 has one eligible: 9
    cl.members.copy_(m)
    cl.offsets.copy_(o)
    ds = common.ViewDataset(data.train, s.views, 0)
    batch = torch.utils.data.default_collate([ds[i] for i in (5, 9)])
    assert batch["src"][0].tolist() == [5] * 4 + [9] * 4 and batch["src"][1].tolist() == [9] * 8
    views = common.device_views(batch, data.train.images, data.mean, data.std, s.views.sizes, torch.device("cpu"))
    assert [tuple(v.shape) for v in views] == [(2, 3, z, z) for z in s.views.sizes]
    args, _, mr = build(["--ablation", "mr"])
    assert args.method == "clim-mr" and mr.state is None and mr.views.sizes == [32, 23] * 2
    assert clim.n_clusters(types.SimpleNamespace(clusters=None), 50000) == 39
    assert clim.n_clusters(types.SimpleNamespace(clusters=None), 1281167) == 1001


# ---------------------------------------------------------------- the cluster tables

def clusters_for_test(tmp_path, n=24, start=0, every=3):
    g = torch.Generator().manual_seed(0)
    data = common.Data(common.Source(torch.arange(n) % 3,
                                     images=torch.randint(0, 255, (n, 3, 8, 8), generator=g, dtype=torch.uint8)),
                       None, None, (0.5,) * 3, (0.25,) * 3)
    args = types.SimpleNamespace(cluster_start=start, cluster_every=every, kmeans_iters=5, pca_dim=4, seed=0,
                                 eligible="mean", device=torch.device("cpu"), workers=0, out=str(tmp_path))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.BatchNorm1d(16))
    net.out_dim = 16
    model = types.SimpleNamespace(encoder_q=types.SimpleNamespace(backbone=net), backbone=net)
    return clim.Clusters(args, data, model, 8, k=3)


def test_cluster_tables_checkpoint_round_trip_mid_interval(tmp_path):
    cl = clusters_for_test(tmp_path)
    calls = []
    real = cl.recluster
    cl.recluster = lambda ep: (calls.append(ep), real(ep))
    for ep in range(5):
        cl.before_epoch(ep)
    assert calls == [0, 3] and cl.last_epoch == 3 and (cl.cluster_of >= 0).all()
    assert 0 <= cl.stats["label_agreement"] <= 1 and cl.stats["clusters_used"] <= 3
    torch.save(cl.state_dict(), tmp_path / "s.pth")
    new = clusters_for_test(tmp_path)
    ptr = new.members.data_ptr()
    new.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=False))
    assert new.members.data_ptr() == ptr and new.members.is_shared()          # copied in place, never rebound
    for k in ("cluster_of", "members", "offsets", "centres", "d2"):
        assert torch.equal(getattr(new, k), getattr(cl, k))
    assert new.last_epoch == 3 and new.stats == cl.stats
    new.recluster = lambda ep: calls.append(("resumed", ep))
    new.before_epoch(4)                                                         # mid-interval: no pass
    new.before_epoch(3)                                                         # resumed inside epoch 3: no pass
    assert calls == [0, 3]
    other = clim.Clusters(new.args, new.data, new.model, 8, k=4)
    with pytest.raises(common.UserError):
        other.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=False))


def _dist_clusters(rank, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    cl = clusters_for_test(path, n=13)                                          # 13 = 6 + 7 rows
    out = clim.cluster_features(cl.model, cl.data, 8, cl.args, 3, epoch=0)
    if rank == 0:
        torch.save(out, os.path.join(path, "dist.pth"))
    torch.distributed.destroy_process_group()


def test_clustering_from_two_ranks_equals_one(tmp_path):
    torch.multiprocessing.spawn(_dist_clusters, args=(free_port(), str(tmp_path)), nprocs=2)
    c2, a2, d2 = torch.load(tmp_path / "dist.pth")
    cl = clusters_for_test(tmp_path, n=13)
    c1, a1, d1 = clim.cluster_features(cl.model, cl.data, 8, cl.args, 3, epoch=0)
    # Features from the same weights (192-term dot products, any summation order: 192 eps of unit scale), whitened
    # by the same projection and normalised: assignments agree unless a point is within noise of a tie.
    assert torch.equal(a1, a2)
    assert torch.allclose(c1, c2, atol=1e3 * EPS32) and torch.allclose(d1, d2, atol=1e3 * EPS32)


# ---------------------------------------------------------------- the CLI end to end

CLI = TINY + ["--subset", "32", "--epochs", "2", "--cluster-every", "1", "--clusters", "4", "--bn-splits", "2",
              "--queue-size", "32", "--pca-dim", "3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 4-step run (clustering at epochs 0 and 1) and a run stopped at step 3 (one step after the pass)."""
    root = tmp_path_factory.mktemp("clim")
    straight = run_cli("clim.py", *CLI, "--out", root / "straight")
    stopped = run_cli("clim.py", *CLI, "--max-steps", "3", "--out", root / "resumed")
    return root, straight, stopped


def test_e2e_smoke_and_show_views(runs):
    root, r, _ = runs
    assert r.rc == 0, r.err
    assert r.json["method"] == "clim" and r.json["steps"] == 4 and r.out.count("clustering at epoch") == 2
    ck = torch.load(root / "straight" / "checkpoint.pth", weights_only=False)
    assert ck["state"]["last_epoch"] == 1 and (ck["state"]["cluster_of"] >= 0).all()
    assert all(math.isfinite(h["loss"]) for h in ck["history"]) and "cluster_time_s" in ck["history"][-1]
    assert {"lambda", "mixed", "epoch_time_s"} <= set(ck["history"][-1])
    v = run_cli("clim.py", *CLI, "--out", root / "straight", "--show-views")
    assert v.rc == 0, v.err
    img = mpimg.imread(v.json["views"])
    assert img.shape[:2] == (840, 1400) and img.std() > 0.05                   # 4 rows x 7 panels


def test_e2e_resume_is_exact_and_does_not_recluster(runs):
    root, straight, stopped = runs
    assert stopped.rc == 0 and stopped.json["steps"] == 3
    r = run_cli("clim.py", *CLI, "--out", root / "resumed")
    assert r.rc == 0 and r.json["steps"] == 4 and "clustering at epoch" not in r.out
    a = torch.load(root / "straight" / "checkpoint.pth", weights_only=False)
    b = torch.load(root / "resumed" / "checkpoint.pth", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # f_q, f_k, both queues
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in ("cluster_of", "members", "offsets", "centres"))


def test_e2e_two_processes_match_split_bn(tmp_path):
    """From the checkpoint at the end of epoch 1, two processes run the clustering pass (sharded) and take step 3
    as one process does."""
    assert_same_update(*last_step_both_ways("clim.py", without(CLI, "--bn-splits"), 3, tmp_path))
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=False) for d in ("one", "two"))
    assert b["state"]["last_epoch"] == 1 and b["step"] == 3
    assert torch.equal(a["state"]["cluster_of"], b["state"]["cluster_of"])


def test_e2e_arms_and_errors(tmp_path):
    r = run_cli("clim.py", *TINY, "--baseline", "--epochs", "1", "--max-steps", "2", "--out", tmp_path / "b")
    assert r.rc == 0, r.err
    assert r.json["method"] == "clim-baseline" and "MoCo-v2, views 2 x 32 px" in r.out and "clustering" not in r.out
    r = run_cli("clim.py", *TINY, "--ablation", "mr", "--epochs", "1", "--max-steps", "2", "--queue-size", "32",
                "--out", tmp_path / "mr")
    assert r.rc == 0 and r.json["method"] == "clim-mr" and "no positives" in r.out and "clustering" not in r.out
    bad = run_cli("clim.py", *TINY, "--clusters", "1000", "--out", tmp_path / "c")
    assert bad.rc == 2 and "--clusters 1000" in bad.err and "Traceback" not in bad.err
    both = run_cli("clim.py", *TINY, "--baseline", "--ablation", "mr", "--out", tmp_path / "d")
    assert both.rc == 2 and "pass one of them" in both.err
