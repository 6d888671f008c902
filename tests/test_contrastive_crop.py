"""Tests of contrastive_crop.py: boxes, reassembly, sampler, suppression, schedule, losses, gradients,
state, workers, and the CLI end to end (method, baseline, resume, 2 processes, --show-views)."""
import io, json, math, random
from argparse import Namespace

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import contrastive_crop as cc
from conftest import TINY, assert_same_update, last_step_both_ways, run_cli, without


def maps_to_feats(m):
    return m.unsqueeze(1).float()  # B x 1 x h x w: the channel sum is the map itself


def box32(m, k=0.1, size=(32, 32)):
    return cc.boxes_from_features(maps_to_feats(m), size, k) * 32


# ---------------------------------------------------------------- boxes

def test_boxes_on_32px_maps():
    m = torch.zeros(3, 32, 32)
    m[0, 5:11, 3:21] = 1
    m[1, 2:5, 2:5] = 1
    m[1, 20:26, 15:31] = 1                              # two blobs -> one closure
    m[2, 4:8, 4:8] = 1
    m[2, 20:30, 20:30] = 0.5                            # k = 0.5 is strict: this region is excluded
    assert box32(m[:1]).tolist() == [[5, 3, 10, 20]]
    assert box32(m[1:2]).tolist() == [[2, 2, 25, 30]]
    assert box32(m[2:], k=0.5).tolist() == [[4, 4, 7, 7]]
    assert box32(m[2:], k=0.49).tolist() == [[4, 4, 29, 29]]


def test_boxes_on_upsampled_4x4_maps():
    m = torch.zeros(2, 4, 4)
    m[0, 1, 2] = 1
    m[1, 0, 0] = 1
    assert box32(m).tolist() == [[5, 13, 18, 26], [0, 0, 10, 10]]


def test_constant_map_gives_the_full_box():
    m = torch.rand(3, 4, 4)
    m[1] = 7.0
    b = cc.boxes_from_features(maps_to_feats(m), (32, 32))
    assert torch.isfinite(b).all() and b[1].tolist() == [0, 0, 1, 1] and b[0].tolist() != [0, 0, 1, 1]


def test_vectorised_boxes_equal_a_per_image_loop():
    g = torch.Generator().manual_seed(0)
    for (h, w), size, k in [((4, 4), (32, 32), 0.1), ((7, 7), (40, 56), 0.3), ((4, 4), (32, 32), 0.6)]:
        feats = torch.randn(24, 8, h, w, generator=g) ** 3
        got = cc.boxes_from_features(feats, size, k)
        for b in range(len(feats)):
            m = feats[b].sum(0)
            m = (m - m.min()) / (m.max() - m.min())
            m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            ys, xs = (m > k).nonzero(as_tuple=True)
            ref = [ys.min() / size[0], xs.min() / size[1], ys.max() / size[0], xs.max() / size[1]]
            assert got[b].tolist() == pytest.approx([float(v) for v in ref], abs=1e-7)
        assert (got[:, 0] <= got[:, 2]).all() and (got[:, 1] <= got[:, 3]).all()
        assert (got.min() >= 0 and (got[:, 2] <= (size[0] - 1) / size[0]).all()
                and (got[:, 3] <= (size[1] - 1) / size[1]).all())


# ---------------------------------------------------------------- sampler

def ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic (numpy)."""
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, x, "right") / len(a) - np.searchsorted(b, x, "right") / len(b)).max()


_ys, _xs = sorted(random.Random(1).random() for _ in range(2)), sorted(random.Random(2).random() for _ in range(2))
BOXES = {"random": (_ys[0], _xs[0], _ys[1], _xs[1]), "point": (0.4, 0.7, 0.4, 0.7), "corner": (0.6, 0.6, 0.97, 0.97),
         "full": cc.FULL_BOX, "simccrop": cc.SIMCCROP_BOX}


def draws(fn, n, seed):
    g = random.Random(seed)
    return np.array([fn(g) for _ in range(n)])


def test_sampler_geometry_and_centres():
    n = 10_000
    for H, W in [(32, 32), (64, 48), (500, 375)]:
        rrc = draws(lambda g: common.rrc_box(H, W, (0.2, 1.0), rng=g), n, "rrc")
        for name, box in BOXES.items():
            for alpha in (0.1, 0.6, 1.0, 2.0):
                d = draws(lambda g: cc.contrastive_crop_box(H, W, box, alpha, (0.2, 1.0), g), n, f"{name}{alpha}")
                t, l, h, w = d.T
                assert (t >= 0).all() and (l >= 0).all() and (t + h <= H).all() and (l + w <= W).all()
                for pos, side, crop, lo, hi in ((t, H, h, box[0], box[2]), (l, W, w, box[1], box[3])):
                    free = (int(side * lo) - crop // 2 >= 0) & (int(side * hi) - crop // 2 <= side - crop)
                    c = pos + crop // 2
                    assert ((c >= int(side * lo)) & (c <= int(side * hi)) | ~free).all(), (H, W, name, alpha)
                assert ((w + 0.5) * (h + 0.5) >= 0.2 * H * W).all() and ((w - 0.5) * (h - 0.5) <= H * W).all()
                assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
                assert ks(h * w / (H * W), rrc[:, 2] * rrc[:, 3] / (H * W)) < 0.03
                assert ks(w / h, rrc[:, 3] / rrc[:, 2]) < 0.03
                if name == "full" and alpha == 1.0 and H < 100:   # uniform in the full box = RRC, within 1 px
                    for a, b in ((t, rrc[:, 0]), (l, rrc[:, 1])):
                        deciles = np.linspace(0.1, 0.9, 9)
                        assert np.abs(np.quantile(a, deciles) - np.quantile(b, deciles)).max() <= 1
                        assert abs(a.mean() - b.mean()) < 1


def test_inactive_views_are_randomresizedcrop_and_seeded():
    boxes, active = torch.tensor([cc.FULL_BOX] * 4), torch.zeros(1, dtype=torch.uint8)
    views = cc.ContrastiveCropViews(boxes, active, 0.6, (0.2, 1.0))
    a = views(2, [(32, 32)], random.Random("s"))
    g = random.Random("s")
    ref = [common.Crop(*common.rrc_box(32, 32, (0.2, 1.0), rng=g), g.random() < 0.5) for _ in range(2)]
    assert a == ref and len(a) == 2
    active.fill_(1)
    b, c = views(2, [(32, 32)], random.Random("s")), views(2, [(32, 32)], random.Random("s"))
    assert b == c and b != a                          # a fixed seed reproduces the crops


def test_center_suppression():
    n = 100_000
    for alpha, std, near in ((0.6, 0.337, 0.145), (0.1, 0.456, None), (1.0, 0.289, 0.20)):
        g = random.Random(f"supp{alpha}")
        u = []
        for _ in range(n):
            t, _, h, _ = cc.contrastive_crop_box(1000, 1000, cc.FULL_BOX, alpha, (0.2, 1.0), g)
            if 1000 - h >= 50:                          # t_lo = 0, t_hi = 1000 - h; skip ranges too short to resolve u
                u.append(t / (1000 - h))
        u = np.array(u)
        assert abs(u.std() - std) < 0.005, (alpha, u.std())
        if near is not None:
            assert abs((np.abs(u - 0.5) < 0.1).mean() - near) < 0.01, (alpha, (np.abs(u - 0.5) < 0.1).mean())


# ---------------------------------------------------------------- schedule

def test_schedule():
    def updates(E, crop="ccrop", warm=0.2, every=0.2):
        Wu, I = cc.loc_schedule(crop, E, warm, every)
        return Wu, I, [e for e in range(1, E + 1) if cc.updates_after(e, E, Wu, I)]
    assert updates(500) == (100, 100, [100, 200, 300, 400])
    assert updates(100) == (20, 20, [20, 40, 60, 80])
    assert updates(2) == (1, 1, [1])
    assert updates(100, every=0)[2] == [] and updates(10, "simccrop") == (0, 0, [])
    assert updates(10, "random")[2] == []
    state = cc.BoxState(10, "ccrop", 0.6, 0.1, 100, 100, 0)
    assert [state.start_epoch(e) or int(state.active) for e in (1, 100, 101)] == [0, 0, 1]
    sim = cc.BoxState(10, "simccrop", 0.1, 0.1, 0, 0, 0)
    sim.start_epoch(1)
    assert int(sim.active) == 1 and sim.boxes[3].tolist() == [0.25, 0.25, 0.75, 0.75]
    rnd = cc.BoxState(10, "random", 0.6, 0.1, 100, 0, 0)
    assert not any(rnd.start_epoch(e) or int(rnd.active) for e in (1, 101, 400))


def test_parse_defaults_and_errors(capsys):
    a = cc.parse(["--dataset", "imagenet", "--framework", "simclr"])
    assert ((a.arch, a.batch_size, a.lr, a.epochs, a.seed, a.alpha, a.box_thresh)
            == ("resnet50", 512, 0.025, 100, 42, 0.6, 0.1))
    b = cc.parse(["--dataset", "stl10", "--crop", "simccrop"])
    assert (b.arch, b.stem, b.batch_size, b.lr, b.bn_splits, b.alpha) == ("resnet18", "cifar", 512, 0.25, 8, 0.1)
    assert cc.parse(["--baseline"]).crop == "random"
    for bad, word in ((["--baseline", "--crop", "simccrop"], "--baseline"), (["--alpha", "0"], "--alpha")):
        with pytest.raises(SystemExit) as e:
            cc.parse(bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and word in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- losses, gradients, shapes

def tiny_setup(*flags):
    args = cc.parse([*TINY, "--subset", "32", "--queue-size", "32", "--out", "/tmp/unused", *flags])
    args.device = torch.device("cpu")
    images, labels = common.synthetic_images(32)
    data = common.Data(common.Source(labels, images=images), None, None, *common.DATASETS["synthetic"]["stats"])
    return args, data, cc.build(args, data)


def test_losses_of_the_four_frameworks():
    z = F.normalize(torch.ones(4, 8), dim=1)
    simclr = tiny_setup("--framework", "simclr")[2].model
    assert simclr.temperature == 0.5 and simclr.loss_scale == pytest.approx(0.5 / 0.07)
    assert (simclr.loss_scale * common.nt_xent(z, z, 0.5)).item() == pytest.approx(13.8994, abs=1e-4)
    eye = torch.eye(8)[:4]
    assert (simclr.loss_scale * common.nt_xent(eye, eye, 0.5)).item() == pytest.approx(4.2460, abs=1e-4)
    moco = tiny_setup("--framework", "mocov2")[2].model
    assert (moco.temperature, moco.momentum) == (0.2, 0.999)
    q = torch.eye(16)[:1]
    assert (common.info_nce(q, q, torch.eye(16)[1:9], 0.2).item()
            == pytest.approx(math.log(1 + 8 * math.exp(-5)), abs=1e-5))
    assert common.info_nce(q, q, q.repeat(8, 1), 0.2).item() == pytest.approx(math.log(9), abs=1e-5)
    p, orth = torch.randn(5, 6), torch.zeros(5, 6)
    orth[:, 0] = 1
    p[:, 0] = 0
    assert (common.byol_loss(p, p, p, p).item() == pytest.approx(-4)
            and common.byol_loss(p, p, orth, orth).item() == pytest.approx(0, abs=1e-6))
    assert common.simsiam_loss(p, p, p, p).item() == pytest.approx(-1)


@pytest.mark.parametrize("fw", ["mocov2", "byol"])
def test_targets_get_no_gradient(fw):
    args, data, s = tiny_setup("--framework", fw)
    model = s.model
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    loss, _ = model(views, None)
    loss.backward()
    frozen = model.encoder_k if fw == "mocov2" else model.target
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_feature_map_shapes():
    with torch.no_grad():
        small = common.feature_map(common.build_backbone("resnet18", "cifar").eval(), torch.randn(2, 3, 32, 32))
        large = common.feature_map(common.build_backbone("resnet50", "imagenet").eval(), torch.randn(1, 3, 224, 224))
    assert small.shape == (2, 512, 4, 4) and large.shape == (1, 2048, 7, 7)


def test_localize_is_pure_and_in_index_order():
    torch.manual_seed(0)
    images, _ = common.synthetic_images(6)
    data = common.Data(common.Source(torch.zeros(6), images=images), None, None, (0.5,) * 3, (0.25,) * 3)
    net = common.build_backbone("resnet18", "cifar")
    net(torch.randn(4, 3, 32, 32)).sum().backward()       # some grads and BN statistics to keep
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    args = Namespace(device=torch.device("cpu"), precision="fp32", batch_size=4, workers=0)
    boxes = cc.localize(net, data, args, 0.1)
    assert net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
    with torch.no_grad():
        ref = cc.boxes_from_features(common.feature_map(net.eval(), (images.float() / 255 - 0.5) / 0.25), (32, 32), 0.1)
    assert boxes.shape == (6, 4) and torch.equal(boxes, ref) and (boxes != torch.tensor(cc.FULL_BOX)).any()


# ---------------------------------------------------------------- state and workers

def test_state_round_trip_and_resume_activity():
    a = cc.BoxState(50, "ccrop", 0.6, 0.1, 100, 100, 42)
    a.update(torch.rand(50, 4).sort(1).values, 100)
    a.start_epoch(150)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = cc.BoxState(50, "ccrop", 0.6, 0.1, 100, 100, 42)
    held = b.boxes
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert b.boxes is held and torch.equal(b.boxes, a.boxes) and int(b.active) == 1   # epoch 150 of 500: active
    assert sorted(b.history) == [0, 100] and all(torch.equal(b.history[e], a.history[e]) for e in a.history)
    assert b.fixed == a.fixed and b.area_log == a.area_log
    with pytest.raises(common.UserError, match="alpha"):
        cc.BoxState(50, "ccrop", 0.3, 0.1, 100, 100, 42).load_state_dict(a.state_dict())


@pytest.mark.parametrize("persistent", [True, False])
def test_workers_see_boxes_changed_in_place(persistent):
    images, labels = common.synthetic_images(32)
    state = cc.BoxState(32, "ccrop", 0.6, 0.1, 1, 1, 0)
    views = cc.ContrastiveCropViews(state.boxes, state.active, 0.6, (0.2, 1.0))
    ds = common.ViewDataset(common.Source(labels, images=images),
                            common.Views(views, [32, 32], [common.Recipe()] * 2), 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, persistent_workers=persistent)

    def centred():  # the crop centre sits on the point box (0.5, 0.5) whenever the sampler reads it
        b = torch.cat([batch["boxes"] for batch in loader]).view(-1, 4)
        return bool(((b[:, 0] + (b[:, 2] // 2) == 16) & (b[:, 1] + (b[:, 3] // 2) == 16)).all())

    assert not centred()
    state.boxes.copy_(torch.tensor([0.5, 0.5, 0.5, 0.5]).expand(32, 4))
    state.start_epoch(2)
    assert centred()


# ---------------------------------------------------------------- the CLI end to end

CLI = TINY + ["--subset", "32", "--epochs", "2", "--bn-splits", "2", "--queue-size", "32", "--lr", "0.05"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 4-step run (box update after epoch 1) and one stopped at step 3 (mid-epoch 2, after the update)."""
    root = tmp_path_factory.mktemp("ccrop")
    straight = run_cli("contrastive_crop.py", *CLI, "--out", root / "straight")
    stopped = run_cli("contrastive_crop.py", *CLI, "--max-steps", "3", "--out", root / "resumed")
    stopped_ck = torch.load(root / "resumed" / "checkpoint.pth", weights_only=False) if stopped.rc == 0 else None
    return root, straight, stopped, stopped_ck


def test_e2e_method_and_show_views(runs):
    root, r, _, _ = runs
    assert r.rc == 0, r.err
    assert set(r.json) >= {"method", "dataset", "epochs", "steps", "train_time_s", "images_per_s", "knn_top1", "out"}
    assert (r.json["method"], r.json["crop"], r.json["steps"]) == ("contrastive_crop", "ccrop", 4)
    assert "boxes updated after epoch 1: mean area" in r.out
    ck = torch.load(root / "straight" / "checkpoint.pth", weights_only=False)
    # 32 px through the ImageNet stem leaves a 1x1 layer4 map: constant heatmaps, so full boxes at every index
    assert torch.equal(ck["state"]["boxes"], torch.tensor(cc.FULL_BOX).expand(32, 4))
    assert sorted(ck["state"]["history"]) == [0, 1] and ck["state"]["epoch"] == 2
    assert [h["crop_active"] for h in ck["history"]] == [0, 1]
    assert [g["lr"] for g in ck["optimizer"]["param_groups"]] == pytest.approx([0.05 * 16 / 256 * (0.1 + 0.9 * 0.5)])
    assert (root / "straight" / "views_e1.png").exists() and (root / "straight" / "box_trajectory.png").exists()
    v = run_cli("contrastive_crop.py", *CLI, "--out", root / "straight", "--show-views")
    assert v.rc == 0, v.err
    img = mpimg.imread(v.json["views"])
    # 4 x 5 panels
    assert v.json["views"].endswith("views.png") and v.json["epoch"] == 2  # the checkpoint's boxes, after epoch 2
    assert img.shape[:2] == (840, 1000) and img.std() > 0.05
    assert mpimg.imread(v.json["trajectory"]).shape[:2] == (280, 1200)


def test_e2e_resume_is_exact(runs):
    root, straight, stopped, _ = runs
    assert stopped.rc == 0 and stopped.json["steps"] == 3
    r = run_cli("contrastive_crop.py", *CLI, "--out", root / "resumed")
    assert r.rc == 0 and r.json["steps"] == 4 and "boxes updated" not in r.out, r.err
    a = torch.load(root / "straight" / "checkpoint.pth", weights_only=False)
    b = torch.load(root / "resumed" / "checkpoint.pth", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["state"]["boxes"], b["state"]["boxes"]) and a["state"]["area_log"] == b["state"]["area_log"]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_e2e_two_processes_match_split_bn(tmp_path):
    """From the checkpoint at the end of epoch 1, two processes localise (sharded pass, boxes gathered back) and take
    step 3 as one process does."""
    args = without(CLI, "--bn-splits")
    assert_same_update(*last_step_both_ways("contrastive_crop.py", args, 3, tmp_path))
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=False) for d in ("one", "two"))
    assert b["step"] == 3 and sorted(b["state"]["history"]) == [0, 1]
    assert torch.equal(a["state"]["boxes"], b["state"]["boxes"])   # every index gathered back (no zero rows)


def test_e2e_simclr_difference_is_noise_not_semantics(tmp_path):
    """SimCLR baseline, 1 process (--bn-splits 2) vs 2 processes: after 4 steps from scratch they differ by ~8 % of a
    step, and so do 1 process on 1 thread vs 2 threads (identical semantics): float noise, amplified ~30x a step
    through 8-sample BatchNorm and the x7.1 loss scale. From one state, the two take the same step to ~1e-5 of it;
    other samples, crops or negatives on a rank would change it by a sizeable fraction."""
    args = ["--framework", "simclr", "--baseline", "--dataset", "synthetic", "--subset", "64", "--batch-size", "16",
            "--epochs", "1", "--workers", "0", "--seed", "0", "--arch", "resnet18", "--stem", "imagenet", "--gpus", "0",
            "--knn-every", "0"]
    assert_same_update(*last_step_both_ways("contrastive_crop.py", args, 4, tmp_path))


def test_show_views_without_training(tmp_path, capsys):
    cc.main([*map(str, TINY), "--subset", "32", "--crop", "simccrop", "--show-views", "--out", str(tmp_path / "v")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["views"].endswith("views.png") and mpimg.imread(out["views"]).shape[:2] == (840, 1000)
    assert (out["crop"], out["epoch"]) == ("simccrop", 1)  # no checkpoint: the boxes epoch 1 would start with
    assert mpimg.imread(out["trajectory"]).shape[:2] == (280, 1200) and not (tmp_path / "v" / "checkpoint.pth").exists()


def test_e2e_baseline(tmp_path):
    r = run_cli("contrastive_crop.py", *TINY, "--baseline", "--epochs", "1", "--max-steps", "2", "--queue-size", "32",
                "--out", tmp_path / "b")
    assert r.rc == 0, r.err
    assert (r.json["method"], r.json["framework"], r.json["steps"]) == ("contrastive_crop-baseline", "mocov2", 2)
    assert json.load(open(tmp_path / "b" / "args.json"))["crop"] == "random" and "boxes updated" not in r.out
    assert not (tmp_path / "b" / "box_trajectory.png").exists()
