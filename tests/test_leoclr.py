"""Tests of leoclr.py: loss closed forms, views, routing, gradients, EMA, queue, DDP, resume, CLI."""
import json, math, random, textwrap

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import TINY, assert_same_update, last_step_both_ways, run_cli
import common
import leoclr


def tiny_backbone(width=8, bn=True):
    net = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), *([nn.BatchNorm2d(width)] if bn else []), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.out_dim = width
    return net


def tiny_model(K=16, baseline=False, **kw):
    torch.manual_seed(0)
    if baseline:  # --baseline: common's symmetric MoCo-v2 with LeOCLR's head
        return common.MoCoV2(tiny_backbone(), [8, 8, 128], K, 0.1, 0.99, symmetric=True)
    return leoclr.LeOCLR(tiny_backbone(), proj_dim=kw.pop("proj_dim", 128), queue_size=K, **kw)


def unit(*idx, dim=16):
    return torch.stack([F.one_hot(torch.tensor(i), dim).float() for i in idx])


def ortho_queue(K, dim, start):
    return torch.eye(dim)[start:start + K]


# ---------------------------------------------------------------- 1. shapes

def test_shapes_of_views_queries_keys_and_logits(monkeypatch):
    src = common.Source(torch.zeros(4, dtype=torch.long), images=common.synthetic_images(4)[0])
    ds = common.ViewDataset(src, common.Views(leoclr.LeOCLRViews(), [32] * 3, leoclr.leoclr_recipes(32)), seed=0)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    views = common.device_views(batch, src.images, (0.5,) * 3, (0.25,) * 3, [32] * 3, torch.device("cpu"))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 3
    model = tiny_model(K=16)
    q, k1, k2 = model.encoder_q(views[0]), *(common.shuffled_forward(model.encoder_k, v) for v in views[1:])
    for z in (q, k1, k2):
        assert z.shape == (4, 128) and torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    seen, ce = [], F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy",
                        lambda logits, y: seen.append((logits.shape, logits.dtype)) or ce(logits, y))
    model(views)
    assert seen == [(torch.Size([4, 17]), torch.float32)] * 2  # B x (1+K), fp32, one per term


# ---------------------------------------------------------------- 2-3. views

def quadrant_image(H=48, W=64):
    colours = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], dtype=torch.uint8)
    img = torch.empty(3, H, W, dtype=torch.uint8)
    for k, (t, l) in enumerate([(0, 0), (0, W // 2), (H // 2, 0), (H // 2, W // 2)]):
        img[:, t:t + H // 2, l:l + W // 2] = colours[k].view(3, 1, 1)
    return img, colours.float() / 255


@pytest.mark.parametrize("in_memory", [True, False])
def test_original_is_the_whole_uncropped_image(tmp_path, in_memory):
    img, colours = quadrant_image()
    if in_memory:
        src = common.Source([0], images=img[None])
    else:
        path = str(tmp_path / "q.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
        src = common.Source([0], files=[path])
    ds = common.ViewDataset(src, common.Views(leoclr.LeOCLRViews(orig_aug="none"), [32] * 3,
                                              leoclr.leoclr_recipes(32, "none")), 0)
    for epoch in range(3):
        ds.epoch.fill_(epoch)
        item = ds[0]
        assert item["boxes"][0].tolist() == [0, 0, 48, 64] and not item["flips"][0]
        batch = torch.utils.data.default_collate([item])
        x = common.device_views(batch, src.images, (0, 0, 0), (1, 1, 1), [32] * 3, torch.device("cpu"))[0][0]
        corners = torch.stack([x[:, 0, 0], x[:, 0, -1], x[:, -1, 0], x[:, -1, -1]])  # TL, TR, BL, BR
        assert (corners - colours).abs().max() <= 2 / 255
    rng = random.Random(0)
    assert leoclr.anchor_box(48, 64, "center", (0.08, 1), rng) == (0, 8, 48, 48)
    assert leoclr.LeOCLRViews()(0, [(48, 64)], rng)[0][:4] == (0, 0, 48, 64)  # full anchor with default orig-aug too


def test_crop_boxes_follow_random_resized_crop():
    H, W = 200, 300
    views, differ = leoclr.LeOCLRViews(), 0
    for i in range(2000):
        x, x1, x2 = views(i, [(H, W)], common.sample_rng(0, 0, i))
        assert x[:4] == (0, 0, H, W)
        for t, l, h, w, _, _ in (x1, x2):
            assert 0 <= t and 0 <= l and t + h <= H and l + w <= W
            slack = (1 + 0.5 / (h - 0.5)) * (1 + 0.5 / (w - 0.5))  # rounding of h and w to pixels
            area, aspect = h * w / (H * W), w / h
            fallback = (h, w) == (H, round(H * 4 / 3)) and (t, l) == ((H - h) // 2, (W - w) // 2)
            assert fallback or 0.08 / slack <= area <= 1.0
            assert fallback or 3 / 4 / slack <= aspect <= 4 / 3 * slack
        differ += x1[:4] != x2[:4]
    assert differ > 0.99 * 2000


# ---------------------------------------------------------------- 4-7. loss

@pytest.mark.parametrize("case, expected", [("aligned", 0.105002), ("orthogonal", 2 * math.log(9)),
                                            ("half", 2.249726), ("aligned-4096", 6.706718)])
def test_loss_closed_form(case, expected):
    if case == "aligned-4096":
        N = F.normalize(torch.randn(4096, 16) * (torch.arange(16) > 0), dim=1)  # every row orthogonal to e1
        q = k1 = k2 = unit(0)
    else:
        N = ortho_queue(8, 16, 2)  # rows e3..e10: orthogonal to e1, e2
        q, k1, k2 = {"aligned": (unit(0),) * 3, "orthogonal": (unit(12), unit(0), unit(1)),
                     "half": (unit(0), unit(0), unit(1))}[case]
    loss, t1, t2 = leoclr.leoclr_loss(q, k1, k2, N, 0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    if case == "aligned":
        assert t1.item() == pytest.approx(math.log(1 + 8 * math.exp(-5)), abs=1e-6)


def test_loss_is_the_sum_of_two_info_nce_terms_and_fp32_under_autocast():
    g = torch.Generator().manual_seed(1)
    q, k1, k2 = (F.normalize(torch.randn(6, 32, generator=g), dim=1) for _ in range(3))
    N = F.normalize(torch.randn(64, 32, generator=g), dim=1)
    loss, t1, t2 = leoclr.leoclr_loss(q, k1, k2, N, 0.1)
    ref1, ref2 = common.info_nce(q, k1, N, 0.1), common.info_nce(q, k2, N, 0.1)
    assert abs(loss.item() - (ref1 + ref2).item()) < 1e-6 and abs(t1.item() - ref1.item()) < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_loss = leoclr.leoclr_loss(q, k1, k2, N, 0.1)[0]
    assert amp_loss.dtype == torch.float32 and abs(amp_loss.item() - loss.item()) < 1e-6


def test_no_crop_crop_term():
    q, N = unit(0), ortho_queue(8, 16, 4)
    k1 = math.cos(0.3) * unit(0) + math.sin(0.3) * unit(1)
    losses = []
    for phi in (0.0, 1.0, 2.5):  # rotates k2 around e1: q.k2 fixed, k1.k2 changes
        k2 = math.cos(0.7) * unit(0) + math.sin(0.7) * (math.cos(phi) * unit(1) + math.sin(phi) * unit(2))
        losses.append(leoclr.leoclr_loss(q, k1, k2, N, 0.2)[0].item())
    assert max(losses) - min(losses) < 1e-6


def test_pairing_of_queries_and_keys():
    g = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(8, 32, generator=g), dim=1)
    k1, k2 = (F.normalize(q + 0.1 * torch.randn(8, 32, generator=g), dim=1) for _ in range(2))
    N = F.normalize(torch.randn(64, 32, generator=g), dim=1)
    base = leoclr.leoclr_loss(q, k1, k2, N, 0.2)[0]
    perm = torch.roll(torch.arange(8), 1)
    assert leoclr.leoclr_loss(q, k1[perm], k2, N, 0.2)[0] > base + 1.0
    assert abs(leoclr.leoclr_loss(q[perm], k1[perm], k2[perm], N, 0.2)[0] - base) < 1e-6


# ---------------------------------------------------------------- 8-11. model

@pytest.mark.parametrize("baseline", [False, True])
def test_routing_of_views_to_encoders(baseline):
    model = tiny_model(K=16, baseline=baseline)
    seen = {"q": [], "k": []}
    model.encoder_q.register_forward_hook(lambda m, inp, out: seen["q"].append(inp[0].unique().tolist()))
    model.encoder_k.register_forward_hook(lambda m, inp, out: seen["k"].append(inp[0].unique().tolist()))
    x, x1, x2 = torch.ones(4, 3, 8, 8), torch.full((4, 3, 8, 8), 2.0), torch.full((4, 3, 8, 8), 3.0)
    model([x1, x2] if baseline else [x, x1, x2])
    assert seen["q"] == ([[2.0], [3.0]] if baseline else [[1.0]])  # the original only; crops under --baseline
    assert seen["k"] == ([[3.0], [2.0]] if baseline else [[2.0], [3.0]])  # both crops, never the original


@pytest.mark.parametrize("baseline", [False, True])
def test_gradient_reaches_only_the_query_encoder(baseline):
    model = tiny_model(K=16, baseline=baseline)
    views = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2 if baseline else 3)]
    loss, logs = model(views)
    loss.backward()
    for p in model.encoder_q.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoder_k.parameters()) and model.queue.queue.grad is None
    assert all(not v.requires_grad for v in logs.values()) and len(logs) == 2


def test_ema_once_per_step():
    model = tiny_model(K=16, momentum=0.99)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.fill_(1.0)
        for p in model.encoder_k.parameters():
            p.fill_(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    views = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    for expected in (0.01, 0.0199):
        loss, _ = model(views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for p in model.encoder_k.parameters():
            assert torch.allclose(p, torch.full_like(p, expected), atol=1e-7)


def test_queue_enqueue_and_snapshot():
    model = tiny_model(K=16, proj_dim=8)
    k1, k2 = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    model.queue.enqueue(k1), model.queue.enqueue(k2)
    assert (int(model.queue.ptr) == 8 and torch.equal(model.queue.queue[:4], k1)
            and torch.equal(model.queue.queue[4:8], k2))
    model.queue.enqueue(k1), model.queue.enqueue(k2)
    assert int(model.queue.ptr) == 0
    before = model.queue.queue.clone()
    views = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    loss, logs = model(views)
    Q = model.queue.queue
    assert int(model.queue.ptr) == 8 and torch.equal(Q[8:], before[8:])
    with torch.no_grad():  # plain BN: statistics do not depend on the shuffle, only their summation order (unit
        # rows through a few layers: tens of eps; 1e-5 = 84 eps)
        assert torch.allclose(Q[:4], model.encoder_k(views[1]), atol=1e-5)
        assert torch.allclose(Q[4:8], model.encoder_k(views[2]), atol=1e-5)
        again = leoclr.leoclr_loss(model.encoder_q(views[0]), Q[:4], Q[4:8], before, model.temperature)
    assert abs(again[0] - loss) < 1e-5 and abs(again[1] - logs["loss_x_x1"]) < 1e-5
    first = tiny_model(K=16, proj_dim=8, enqueue="first")
    first(views)
    assert int(first.queue.ptr) == 4


def test_queue_size_is_checked_at_start_up():
    with pytest.raises(common.UserError, match="multiple of the 8 keys"):
        leoclr.check_queue(12, 4, "both")
    leoclr.check_queue(12, 4, "first")
    args = leoclr.parse(["--dataset", "synthetic", "--queue-size", "12", "--batch-size", "4"])
    data = common.Data(common.Source([0] * 4, images=torch.zeros(4, 3, 32, 32, dtype=torch.uint8)), None, None,
                       (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(common.UserError, match="--queue-size 12"):
        leoclr.build(args, data)
    assert (leoclr.parse(["--dataset", "cifar10"]).bn_splits == 8
            and leoclr.parse(["--dataset", "imagenet"]).queue_size == 65536)


# ---------------------------------------------------------------- 12. DDP (2 gloo processes)

DDP_SCRIPT = textwrap.dedent("""
    import json, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
    import common, leoclr
    dist.init_process_group("gloo")
    r, B = dist.get_rank(), 4
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.out_dim = 8
    model = leoclr.LeOCLR(net, proj_dim=16, queue_size=32)
    g = torch.Generator().manual_seed(100 + r)  # different images on each rank
    views = [torch.randn(B, 3, 8, 8, generator=g) for _ in range(3)]
    model(views)[0].backward()
    with torch.no_grad():  # no BN: keys do not depend on the shuffle
        k1, k2 = (common.gather_no_grad(F.normalize(model.encoder_k(v), dim=1)) for v in views[1:])
    Q = common.gather_no_grad(model.queue.queue[None])
    x = torch.randn(B, 5, generator=g)
    out = {"same_queue": torch.equal(Q[0], Q[1]), "ptr": int(model.queue.ptr),
           "layout": torch.allclose(Q[0][:16], torch.cat([k1, k2]), atol=1e-6),
           "shuffle_identity": torch.equal(common.shuffled_forward(nn.Identity(), x), x)}
    if r == 0:
        print(json.dumps(out))
    dist.barrier()  # neither process tears its connections down while the other still uses them
    dist.destroy_process_group()
""")


def test_ddp_queue_and_shuffle(tmp_path):
    script = tmp_path / "ddp_leoclr.py"
    script.write_text(DDP_SCRIPT)
    res = run_cli(str(script), nproc=2)
    assert res.rc == 0, res.err[-2000:]
    assert res.json == {"same_queue": True, "ptr": 2 * 4 * 2, "layout": True, "shuffle_identity": True}


def test_two_processes_equal_one_process_with_split_bn(tmp_path):
    common_args = [*TINY, "--stem", "cifar", "--lr", "0.01", "--queue-size", "64", "--epochs", "1"]
    prev, one, two = last_step_both_ways("leoclr.py", common_args, 2, tmp_path)
    assert int(one["queue.ptr"]) == int(two["queue.ptr"]) == 0  # 2 steps x 32 keys, K 64
    assert_same_update(prev, one, two)


# ---------------------------------------------------------------- 13-14. resume and CLI

def test_resume_round_trip_equals_a_straight_run(tmp_path, capsys):
    argv = [*TINY, "--subset", "48", "--epochs", "2", "--queue-size", "64"]
    leoclr.main([*argv, "--max-steps", "3", "--out", str(tmp_path / "split")])  # epoch 1, saved
    leoclr.main([*argv, "--out", str(tmp_path / "split")])                      # resumes, epoch 2
    leoclr.main([*argv, "--out", str(tmp_path / "straight")])
    assert "resumed from" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=False) for d in ("split", "straight"))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])  # E_q, E_k, queue, ptr
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


@pytest.mark.parametrize("baseline", [False, True])
def test_cli_smoke_and_show_views(tmp_path, baseline, capsys):
    out = tmp_path / "run"
    flags = ["--baseline"] if baseline else []
    res = run_cli("leoclr.py", *TINY, *flags, "--max-steps", "20", "--queue-size", "64", "--out", out)
    assert res.rc == 0, res.err[-2000:]
    method = "leoclr-baseline" if baseline else "leoclr"
    assert set(res.json) >= {"method", "dataset", "epochs", "steps", "train_time_s", "images_per_s", "knn_top1", "out"}
    assert res.json["method"] == method and res.json["steps"] == 20 and res.json["epochs"] == 800
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    terms = ["loss_q1_k2", "loss_q2_k1"] if baseline else ["loss_x_x1", "loss_x_x2"]
    assert len(logs) == 5 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(abs(h["loss"] - h[terms[0]] - h[terms[1]]) < 1e-4 for h in logs)
    assert (out / "checkpoint.pth").stat().st_size > 0 and (out / "backbone.pth").exists()
    leoclr.main([*TINY, *flags, "--show-views", "--out", str(out)])  # with a checkpoint present: no training
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["method"] == method
    png = mpimg.imread(out / "views.png")
    assert png.shape[:2] == (840, 1000 if baseline else 1400) and np.ptp(png[..., :3]) > 0.5


def test_bad_flag_combinations_end_in_one_line(capsys):
    for argv, msg in [(["--baseline", "--anchor", "crop"], "--baseline does not have"),
                      (["--crop-scale", "0.5", "0.2"], "0 < MIN <= MAX <= 1")]:
        with pytest.raises(SystemExit) as e:
            leoclr.parse(["--dataset", "synthetic", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0]
