"""CLIM (clim.py): losses at closed-form values, CutMix, the selection pass, the worker-side neighbour draw,
checkpointed state, the --baseline reduction, and the CLI end to end (1 vs 2 processes, resume, --show-views)."""
import math, os, random, types

import matplotlib.image as mpimg
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clim
import common
from conftest import EPS32, TINY, assert_same_update, free_port, last_step_both_ways, run_cli, without

e = torch.eye(3)


def unit(deg):
    return torch.tensor([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


# ---------------------------------------------------------------- losses

def test_nce_closed_form():
    q, queue = e[:1, :2], -e[:1, :2]
    assert clim.nce(q, q, queue, 1.0).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)   # 0.126928
    assert clim.nce(q, q, queue, 0.2).item() == pytest.approx(4.540e-5, rel=1e-3)


def test_mix_nce_closed_form_and_no_gradient_to_targets():
    q, k, kn, queue = e[:1, :2], e[:1, :2], e[1:2, :2], -e[:1, :2]
    for lam, want in ((0.25, 0.266678), (0.5, 0.220095), (1.0, 0.126928)):
        assert clim.mix_nce(q, k, kn, torch.tensor([lam]), queue, 1.0).item() == pytest.approx(want, abs=1e-6)
    u = F.normalize(torch.randn(5, 8), dim=1)
    qn, kk, Q = u[:2], u[2:4], u[4:]
    for lam in (0.1, 0.7):  # k~ = k: the mixture is l(q~, k) for every lambda
        assert torch.allclose(clim.mix_nce(qn, kk, kk, torch.full((2,), lam), Q, 0.2), clim.nce(qn, kk, Q, 0.2))
    qg, kg, kng, lamg, Qg = (t.clone().requires_grad_() for t in (qn, kk, u[:2].flip(0), torch.full((2,), 0.3), Q))
    clim.mix_nce(qg, kg, kng, lamg, Qg, 0.2).backward()
    assert qg.grad.abs().sum() > 0 and all(t.grad is None for t in (kg, kng, lamg, Qg))


def test_total_loss_is_the_mean_of_all_terms():
    assert clim.total_loss(torch.tensor(1.0), torch.tensor(2.0), [torch.tensor(3.0), torch.tensor(4.0)]) == 2.5
    assert clim.total_loss(torch.tensor(1.0), None, [torch.tensor(3.0)]) == 2.0   # --baseline with MR views
    assert clim.total_loss(torch.tensor(1.0), None, []) == 1.0


# ---------------------------------------------------------------- CutMix / Mixup

def test_cutmix_lambda_is_the_unmasked_share():
    g = torch.Generator().manual_seed(0)
    xq, xn = torch.zeros(64, 3, 32, 32), torch.ones(64, 3, 32, 32)
    lam0, centre = torch.rand(64, generator=g), torch.rand(64, 2, generator=g) * 32
    xm, lam, box = clim.cutmix(xq, xn, lam0, centre)
    assert torch.equal(xm[:, 0].mean((1, 2)), 1 - lam)                       # pasted fraction = 1 - lambda exactly
    assert (lam >= lam0 - 1.5 / 32).all() and lam.max() <= 1  # clipping raises it; rounding the side: < 1.5 px
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(clim.cutmix(x, torch.randn_like(x), torch.ones(4), torch.full((4, 2), 16.0))[0], x)  # lam0 = 1
    _, lam, box = clim.cutmix(x[:1], x[:1], torch.tensor([0.75]), torch.zeros(1, 2))  # side 16 at the corner
    assert box[0].tolist() == [0, 0, 8, 8] and lam.item() == pytest.approx(0.9375)
    xm, lam, _ = clim.mix_views("mixup", xq, xn, lam0, centre)
    assert torch.allclose(xm, (1 - lam0).view(-1, 1, 1, 1).expand_as(xm)) and torch.equal(lam, lam0)


# ---------------------------------------------------------------- selection

def test_selection_rules():
    pts = torch.stack([unit(40), unit(25), unit(58), unit(20), unit(0)])      # anchor i40, then i25, i58, i20, i0
    centres = torch.stack([unit(0), unit(90)])
    assign = torch.tensor([0, 1, 0, 0, 0])                                     # 25 deg lies in the other cluster
    want = {"knn": [1, 2, 3], "cluster": [2, 3, -1], "center": [3, -1, -1]}
    for rule, row in want.items():
        t = clim.select_neighbours(pts, assign, centres, 3, rule)
        assert t.dtype == torch.int32 and t.shape == (5, 3) and t[0].tolist() == row, rule
    assert clim.select_neighbours(pts, assign, centres, 3, "center")[4].tolist() == [-1, -1, -1]  # the most central


def test_knn_excludes_self_and_is_chunk_invariant():
    z = F.normalize(torch.randn(30, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    z[7] = z[3]                                                                # an exact duplicate
    rows = torch.arange(30)
    ref = clim.knn(z, rows, 5, chunk=30)
    assert not (ref == rows[:, None]).any() and ref[3, 0] == 7 and ref[7, 0] == 3
    assert torch.equal(ref, clim.knn(z, rows, 5, chunk=1)) and torch.equal(ref, clim.knn(z, rows, 5, chunk=7))


def test_spherical_kmeans_recovers_blobs_and_reseeds_empty_clusters():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(e.repeat_interleave(20, 0) + 0.05 * torch.randn(60, 3, generator=g), dim=1)
    c, a = clim.spherical_kmeans(z, 3, 10, seed=3)
    assert (sorted(set(a.view(3, 20).mode(1).values.tolist())) == [0, 1, 2]
            and all(len(set(r)) == 1 for r in a.view(3, 20).tolist()))
    assert torch.allclose(c.norm(dim=1), torch.ones(3), atol=1e-5)
    c2, a2 = clim.spherical_kmeans(z, 3, 10, seed=3)
    assert torch.equal(c, c2) and torch.equal(a, a2)
    dup = e.repeat(4, 1)                       # 3 distinct points, 4 clusters: one always empties and is re-seeded
    c, _ = clim.spherical_kmeans(dup, 4, 3, seed=0)
    assert torch.allclose(c.norm(dim=1), torch.ones(4), atol=1e-5)


def test_schedule():
    assert [ep for ep in range(100) if clim.selects_at(ep, 10, 5)] == list(range(10, 100, 5))


# ---------------------------------------------------------------- worker side

def test_neighbour_draw_and_persistent_workers():
    table = torch.full((8, 4), -1, dtype=torch.int32).share_memory_()
    table[0, :2] = torch.tensor([5, 7])
    seen = {clim.neighbour_sources(table, 0, random.Random(s))[-1] for s in range(200)}
    assert seen == {5, 7} and clim.neighbour_sources(table, 1, random.Random(0)) == [1]
    table.fill_(-1)
    src = common.Source([0] * 8, images=torch.zeros(8, 3, 8, 8, dtype=torch.uint8))
    views = common.Views(clim.CLIMViews(clim.view_names(False, "cutmix", [])), [8] * 4, [common.Recipe()] * 4,
                         lambda i, rng: clim.neighbour_sources(table, i, rng))
    ds = common.ViewDataset(src, views, 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True)
    first = next(iter(loader))["src"][:, 2]
    table.copy_(torch.tensor([[(i + 1) % 8, -1, -1, -1] for i in range(8)], dtype=torch.int32))
    second = next(iter(loader))["src"][:, 2]                                   # same workers, next epoch
    assert first.tolist() == list(range(8)) and second.tolist() == [(i + 1) % 8 for i in range(8)]


# ---------------------------------------------------------------- model

def small_model(names=("x_q", "x_k", "x_n", "x_n2", "x_s8"), K=64):
    torch.manual_seed(0)
    return clim.CLIM(common.build_backbone("resnet18", "imagenet"), list(names), K, 0.2, 0.99, "cutmix")


def fake_batch(B, n_views, S=32):
    g = torch.Generator().manual_seed(2)
    return {"src": torch.randint(0, 2 * B, (B, n_views)), "index": torch.arange(B),
            "mix_lam0": torch.rand(B, generator=g), "mix_centre": torch.rand(B, 2, generator=g) * S}


def test_gradients_ema_and_queue():
    m = small_model()
    B, sizes = 4, [16, 16, 16, 16, 8]
    views = [torch.randn(B, 3, s, s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(sizes)]
    q0 = {k: v.clone() for k, v in m.encoder_q.state_dict().items()}
    k0 = {k: v.clone() for k, v in m.encoder_k.state_dict().items()}
    loss, logs = m(views, fake_batch(B, 5, S=16))
    loss.backward()
    assert torch.isfinite(loss) and set(logs) == {"lambda", "has_neighbour", "loss_ins", "loss_mix"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder_q.parameters())
    assert all(p.grad is None for p in m.encoder_k.parameters()) and not m.queue.queue.requires_grad
    assert m.queue.ptr.item() == B                                             # ptr += global batch mod K
    for name, p in m.encoder_k.named_parameters():                             # f_k = m f_k + (1 - m) f_q
        assert torch.allclose(p, 0.99 * k0[name] + 0.01 * q0[name], atol=1e-6), name


def test_mixup_and_hard_positive_variants():
    views = [torch.randn(4, 3, s, s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate([16] * 4)]
    batch = fake_batch(4, 4, S=16)
    m = small_model(["x_q", "x_k", "x_n", "x_n2"])
    m.mix = "mixup"
    loss, logs = m(views, batch)
    assert torch.isfinite(loss) and torch.allclose(logs["lambda"], batch["mix_lam0"].mean())
    m = small_model(["x_q", "x_k", "x_n"])                                     # --mix none: no x_n2, no lambda
    m.mix = "none"
    loss, logs = m(views[:3], batch)
    assert torch.isfinite(loss) and "lambda" not in logs and m.queue.ptr.item() == 4
    assert clim.view_names(False, "none", [24]) == ["x_q", "x_k", "x_n", "x_s24"]


def test_baseline_loss_equals_common_mocov2():
    args = clim.parse(TINY + ["--baseline"])
    args.device = torch.device("cpu")
    data = common.load_data(args)
    common.resolve_data(args, data)
    setup = clim.build(args, data)
    assert setup.model.names == ["x_q", "x_k"] and setup.views.sizes == [32, 32] and setup.state is None
    ref = common.MoCoV2(common.build_backbone("resnet18", "imagenet"), [512, 512, 128], args.queue_size, 0.2, 0.999)
    ref.load_state_dict(setup.model.state_dict())
    views = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    torch.manual_seed(5)
    a, _ = setup.model(views, {})
    torch.manual_seed(5)
    b, _ = ref(views)
    assert a.item() == b.item() and torch.equal(setup.model.queue.queue, ref.queue.queue)


def test_views_shapes_and_sources():
    args = clim.parse(TINY + ["--clusters", "4"])
    args.device = torch.device("cpu")
    data = common.load_data(args)
    common.resolve_data(args, data)
    s = clim.build(args, data)
    assert s.views.sizes == [32, 32, 32, 32, 24, 16] and len(s.views.recipes) == 6
    sel = s.state
    sel.table[3, 0] = 9
    ds = common.ViewDataset(data.train, s.views, 0)
    batch = torch.utils.data.default_collate([ds[i] for i in (3, 4)])
    assert batch["src"][0].tolist() == [3, 3, 9, 9, 3, 3] and batch["src"][1].tolist() == [4] * 6  # j = 9; 4 has none
    views = common.device_views(batch, data.train.images, data.mean, data.std, s.views.sizes, torch.device("cpu"))
    assert [tuple(v.shape) for v in views] == [(2, 3, z, z) for z in s.views.sizes]
    assert 0 <= batch["mix_lam0"].min() and batch["mix_centre"].shape == (2, 2)


# ---------------------------------------------------------------- selection state

def selection_for_test(tmp_path, n=24):
    g = torch.Generator().manual_seed(0)
    data = common.Data(common.Source(torch.arange(n) % 3,
                                     images=torch.randint(0, 255, (n, 3, 8, 8), generator=g, dtype=torch.uint8)),
                       None, None, (0.5,) * 3, (0.25,) * 3)
    args = types.SimpleNamespace(knn=4, select="center", select_start=2, select_every=3, kmeans_iters=5, seed=0,
                                 device=torch.device("cpu"), workers=0, out=str(tmp_path))
    torch.manual_seed(0)
    model = types.SimpleNamespace(encoder_k=nn.Sequential(nn.Flatten(), nn.Linear(192, 128), nn.BatchNorm1d(128)))
    return clim.NeighbourSelection(args, data, model, 8, clusters=3)


def test_selection_checkpoint_round_trip_and_schedule(tmp_path):
    sel = selection_for_test(tmp_path)
    calls = []
    real = sel.select
    sel.select = lambda ep: (calls.append(ep), real(ep))
    for ep in range(9):
        sel.before_epoch(ep)
    assert calls == [2, 5, 8] and sel.last_select_epoch == 8 and (sel.table >= 0).any()
    assert os.path.exists(tmp_path / "selection_e0008.png") and 0 <= sel.stats["label_agreement"] <= 1
    torch.save(sel.state_dict(), tmp_path / "s.pth")
    new = selection_for_test(tmp_path)
    ptr = new.table.data_ptr()
    new.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=False))
    assert new.table.data_ptr() == ptr and new.table.is_shared()              # copied in place, never rebound
    for k in ("table", "assign", "centres"):
        assert torch.equal(getattr(new, k), getattr(sel, k))
    assert new.last_select_epoch == 8 and new.stats == sel.stats
    new.select = lambda ep: calls.append(("resumed", ep))
    new.before_epoch(9)                                                        # mid-interval: no pass
    assert calls == [2, 5, 8]
    new.args.knn = 5
    with pytest.raises(common.UserError):
        new.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=False))


def _dist_selection(rank, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    sel = selection_for_test(path, n=13)                                       # 13 = 7 + 6: rank 1 pads one row
    res = clim.selection_pass(sel.model.encoder_k, sel.data, 8, sel.args, 3, epoch=0)
    if rank == 0:
        torch.save({k: v for k, v in res.items()}, os.path.join(path, "dist.pth"))
    torch.distributed.destroy_process_group()


def test_bank_and_table_from_two_ranks_equal_one(tmp_path):
    torch.multiprocessing.spawn(_dist_selection, args=(free_port(), str(tmp_path)), nprocs=2)
    two = torch.load(tmp_path / "dist.pth")
    sel = selection_for_test(tmp_path, n=13)
    one = clim.selection_pass(sel.model.encoder_k, sel.data, 8, sel.args, 3, epoch=0)
    x = (sel.data.train.images.float() / 255 - 0.5) / 0.25
    # Unit rows from the same weights, batched differently: a 192-term dot product in fp32 is off by at most
    # 192 eps of its unit-scale result (worst case, any summation order).
    tol = 192 * EPS32
    assert torch.allclose(one["z"], F.normalize(sel.model.encoder_k.eval()(x), dim=1), atol=tol)  # index order
    assert torch.allclose(two["z"], one["z"], atol=tol)
    # Discrete outputs agree exactly when no point is within noise of a tie between its two nearest centres.
    top2 = (one["z"] @ one["centres"].T).topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 4 * tol
    assert torch.equal(two["assign"], one["assign"])
    assert torch.equal(two["table"], one["table"]) and two["table"].shape == (13, 4)


# ---------------------------------------------------------------- the CLI end to end

CLI = TINY + ["--subset", "32", "--epochs", "2", "--select-start", "1", "--select-every", "1", "--clusters", "4",
              "--bn-splits", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 4-step run (selection at epoch 1) and a run stopped at step 3 (one step after the selection)."""
    root = tmp_path_factory.mktemp("clim")
    straight = run_cli("clim.py", *CLI, "--out", root / "straight")
    stopped = run_cli("clim.py", *CLI, "--max-steps", "3", "--out", root / "resumed")
    stopped_ck = torch.load(root / "resumed" / "checkpoint.pth", weights_only=False) if stopped.rc == 0 else None
    return root, straight, stopped, stopped_ck


def test_e2e_smoke_and_show_views(runs):
    root, r, _, _ = runs
    assert r.rc == 0, r.err
    assert set(r.json) >= {"method", "dataset", "epochs", "steps", "train_time_s", "images_per_s", "knn_top1", "out"}
    assert r.json["method"] == "clim" and r.json["steps"] == 4
    ck = torch.load(root / "straight" / "checkpoint.pth", weights_only=False)
    assert ck["state"]["last_select_epoch"] == 1 and (ck["state"]["table"] >= 0).any()
    assert all(math.isfinite(h["loss"]) for h in ck["history"]) and "select_has_neighbour" in ck["history"][-1]
    assert os.path.exists(root / "straight" / "selection_e0001.png")
    v = run_cli("clim.py", *CLI, "--out", root / "straight", "--show-views")
    assert v.rc == 0, v.err
    img = mpimg.imread(v.json["views"])
    assert img.shape[:2] == (840, 1400) and img.std() > 0.05                   # 4 rows x 7 panels
    assert mpimg.imread(v.json["selection"]).shape[0] == 6 * 200 + 40          # 6 anchor rows


def test_e2e_resume_is_exact_and_does_not_reselect(runs):
    root, straight, stopped, _ = runs
    assert stopped.rc == 0 and stopped.json["steps"] == 3
    r = run_cli("clim.py", *CLI, "--out", root / "resumed")
    assert r.rc == 0 and r.json["steps"] == 4 and "selection at epoch" not in r.out
    a = torch.load(root / "straight" / "checkpoint.pth", weights_only=False)
    b = torch.load(root / "resumed" / "checkpoint.pth", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # f_q, f_k, queue, ptr
    assert (torch.equal(a["state"]["table"], b["state"]["table"])
            and torch.equal(a["state"]["centres"], b["state"]["centres"]))


def test_e2e_two_processes_match_split_bn(tmp_path):
    """From the checkpoint at the end of epoch 1, two processes run the selection pass (sharded) and take step 3 as
    one process does."""
    args = without(CLI, "--bn-splits")
    assert_same_update(*last_step_both_ways("clim.py", args, 3, tmp_path))
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=False) for d in ("one", "two"))
    assert b["state"]["last_select_epoch"] == 1 and b["step"] == 3
    assert torch.equal(a["state"]["table"], b["state"]["table"])


def test_e2e_baseline(tmp_path):
    r = run_cli("clim.py", *TINY, "--baseline", "--epochs", "1", "--max-steps", "2", "--out", tmp_path / "b")
    assert r.rc == 0, r.err
    assert r.json["method"] == "clim-baseline" and r.json["steps"] == 2
    assert "views x_q@32 x_k@32; K 4096" in r.out and "selection" not in r.out
    bad = run_cli("clim.py", *TINY, "--clusters", "1000", "--out", tmp_path / "c")
    assert bad.rc == 2 and "--clusters 1000" in bad.err and "Traceback" not in bad.err
