"""Tests of common.py (the foundation) and linear_eval.py."""
import itertools, json, math, os, random, re, time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms.functional as TF

import common
from conftest import CIFAR_MINI, TINY, assert_same_update, last_step_both_ways, requires_cifar_mini, run_cli

SCALE = 0.5 / 0.07


# ---------------------------------------------------------------- losses at constructed inputs

def test_nt_xent_identical_features():
    z = torch.nn.functional.normalize(torch.ones(4, 8), dim=1)
    assert common.nt_xent(z, z.clone(), 0.5).item() == pytest.approx(math.log(7), abs=1e-5)
    assert SCALE * common.nt_xent(z, z.clone(), 0.5).item() == pytest.approx(13.8994, abs=1e-3)


def test_nt_xent_orthonormal_images():
    z = torch.eye(4, 8)
    assert SCALE * common.nt_xent(z, z.clone(), 0.5).item() == pytest.approx(4.2460, abs=1e-3)


def test_info_nce_closed_form():
    q = torch.eye(1, 16)
    queue = torch.eye(16)[1:9]                      # K = 8 keys orthogonal to q
    assert common.info_nce(q, q, queue, 0.2).item() == pytest.approx(math.log(1 + 8 * math.exp(-5)), abs=1e-5)
    assert common.info_nce(q, q, q.repeat(8, 1), 0.2).item() == pytest.approx(math.log(9), abs=1e-5)


def test_byol_and_simsiam_closed_form():
    p = torch.randn(5, 7)
    orth = torch.cat([torch.zeros(5, 1), torch.randn(5, 6)], 1)
    p_orth = torch.cat([torch.ones(5, 1), torch.zeros(5, 6)], 1)
    assert common.byol_loss(p, p, p, p).item() == pytest.approx(-4, abs=1e-5)
    assert common.byol_loss(p_orth, p_orth, orth, orth).item() == pytest.approx(0, abs=1e-6)
    assert common.simsiam_loss(p, p, p, p).item() == pytest.approx(-1, abs=1e-6)


def small_backbone():
    return common.build_backbone("resnet18", "imagenet")


def views(n=2, b=4, s=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, 3, s, s, generator=g) for _ in range(n)]


def test_gradients_reach_only_online_parameters():
    torch.manual_seed(0)
    moco = common.MoCoV2(small_backbone(), [512, 512, 128], queue_size=16, temperature=0.2, momentum=0.99)
    loss, _ = moco(views())
    loss.backward()
    assert all(p.grad is None for p in moco.encoder_k.parameters())
    assert not moco.queue.queue.requires_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moco.encoder_q.head.parameters())
    byol = common.BYOL(small_backbone(), [512, 512, 128], 512)
    byol(views())[0].backward()
    assert all(p.grad is None for p in byol.target.parameters())
    assert byol.online.backbone.conv1.weight.grad.abs().sum() > 0
    simclr = common.SimCLR(small_backbone(), [512, 512, 128])
    simclr(views())[0].backward()
    assert all(p.grad is not None for p in simclr.parameters())


def test_ema_update_exact():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    nn.init.zeros_(a.weight), nn.init.zeros_(a.bias), nn.init.ones_(b.weight), nn.init.ones_(b.bias)
    common.ema_update(a, b, 0.99)
    assert torch.allclose(a.weight, torch.full((3, 3), 0.01))
    common.ema_update(a, b, 0.99)
    assert torch.allclose(a.weight, torch.full((3, 3), 0.0199))


def test_queue_pointer_wraps():
    q = common.Queue(12, 4)
    keys = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    q.enqueue(keys)
    assert q.ptr.item() == 8 and torch.equal(q.queue[:8], keys)
    q.enqueue(keys)
    assert q.ptr.item() == 4 and torch.equal(q.queue[8:], keys[:4]) and torch.equal(q.queue[:4], keys[4:])


def test_moco_uses_the_queue_as_it_stood_at_step_start():
    torch.manual_seed(0)
    moco = common.MoCoV2(small_backbone(), [512, 512, 128], queue_size=8, temperature=0.2, momentum=0.99)
    before = moco.queue.queue.clone()
    v = views(b=4)
    loss, _ = moco(v)
    with torch.no_grad():
        q = moco.encoder_q(v[0])
    k = moco.queue.queue[:4]                                  # the keys just enqueued
    assert torch.equal(moco.queue.queue[4:], before[4:])
    assert loss.item() == pytest.approx(common.info_nce(q, k, before, 0.2).item(), abs=1e-4)


# ---------------------------------------------------------------- photometric vs torchvision

def _ref(img, p):
    """torchvision functional ops, one image at a time, in the drawn order."""
    x = img.clone()
    if p[0] > 0:
        for op in p[5:9].long().tolist():
            x = [lambda y: TF.adjust_brightness(y, float(p[1])), lambda y: TF.adjust_contrast(y, float(p[2])),
                 lambda y: TF.adjust_saturation(y, float(p[3])), lambda y: TF.adjust_hue(y, float(p[4]))][op](x)
    if p[9] > 0:
        x = TF.rgb_to_grayscale(x, 3)
    if p[10] > 0:
        k = max(3, int(0.1 * x.shape[-1]) // 2 * 2 + 1)
        x = TF.gaussian_blur(x, [k, k], [float(p[10])] * 2)
    if p[11] > 0:
        x = TF.solarize(x, 0.5)
    return x


def test_photometric_equals_torchvision_per_sample():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 40, 40)
    rec = common.Recipe(jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=1.0, p_gray=0.5, p_blur=0.5, p_solarize=0.5)
    params = torch.tensor([rec.draw(common.sample_rng(0, 0, i)) for i in range(6)])
    params[0, 9:] = torch.tensor([0.0, 0.0, 0.0])              # jitter only
    params[1, 9:] = torch.tensor([1.0, 0.0, 0.0])              # + grayscale
    params[2, 9:] = torch.tensor([0.0, 1.3, 0.0])              # + blur
    params[3, 9:] = torch.tensor([0.0, 0.0, 1.0])              # + solarize
    params[4, 0] = 0.0                                         # no jitter
    out = common.photometric(x, params)
    for i in range(6):
        assert torch.allclose(out[i], _ref(x[i], params[i]), atol=1e-5, rtol=0), f"sample {i}"


def test_photometric_every_order_and_combination_equals_torchvision():
    """64 samples: each of the 24 jitter orders twice and jitter off 16 times, each meeting grayscale/blur/solarize
    on or off in all 8 combinations; factors wider than any recipe's; uint8-valued images with gray pixels and channel
    ties (the hue formula's special cases). torchvision's own float32 hue round trip is 1e-6 from float64, so 1e-5
    leaves room for its amplification by the ops after it."""
    g = torch.Generator().manual_seed(0)
    orders = list(itertools.permutations(range(4))) * 2 + [(0, 1, 2, 3)] * 16
    combos = list(itertools.product([0.0, 1.0], repeat=3))
    rows = []
    for i, order in enumerate(orders):
        gray, blur, solarize = combos[(i + i // 8) % 8]          # the shift gives each order two different combinations
        factors = (torch.rand(4, generator=g) * torch.tensor([2.0, 2, 2, 1]) - torch.tensor([0, 0, 0, 0.5])).tolist()
        sigma = 0.1 + 1.9 * torch.rand(1, generator=g).item() if blur else 0.0
        rows.append([float(i < 48), *factors, *order, gray, sigma, solarize])
    p = torch.tensor(rows)
    x = torch.randint(0, 256, (len(p), 3, 40, 40), generator=g).float() / 255
    x[:, :, 0] = x[:, :1, 0]                                   # a gray row: max = min
    x[:, 1, 1] = x[:, 0, 1]                                    # a row where R = G
    out = common.photometric(x, p)
    err = torch.stack([(out[i] - _ref(x[i], p[i])).abs().max() for i in range(len(p))])
    assert err.max() <= 1e-5, f"max error {err.max():.2e} at {p[err.argmax()].tolist()}"


def test_recipe_draw_fills_the_named_columns():
    rec = common.Recipe(jitter=(0.4, 0.3, 0.2, 0.1), p_jitter=1.0, p_gray=0.0, p_blur=1.0, p_solarize=0.0)
    p = torch.tensor(rec.draw(random.Random(0)))
    assert len(p) == common.Recipe.NPARAM and p[common.P_ON] == 1
    assert p[common.P_GRAY] == 0 and p[common.P_SOLARIZE] == 0
    assert sorted(p[common.P_ORDER].tolist()) == [0, 1, 2, 3] and 0.1 <= p[common.P_SIGMA] <= 2.0
    assert 0.6 <= p[common.P_BRIGHT] <= 1.4 and 0.7 <= p[common.P_CONTRAST] <= 1.3 and 0.8 <= p[common.P_SAT] <= 1.2
    assert -0.1 <= p[common.P_HUE] <= 0.1


def test_photometric_draws_differ_per_sample():
    rec = common.mocov2_recipe(blur=True)
    a, b = (torch.tensor(rec.draw(common.sample_rng(0, 0, i))) for i in (0, 1))
    assert not torch.equal(a, b)
    assert torch.equal(a, torch.tensor(rec.draw(common.sample_rng(0, 0, 0))))     # same (seed, epoch, index)
    assert not torch.equal(a, torch.tensor(rec.draw(common.sample_rng(0, 1, 0))))  # next epoch differs
    x = torch.rand(1, 3, 16, 16).repeat(2, 1, 1, 1)
    p = torch.stack([a, b])
    p[:, common.P_ON] = 1.0  # jitter on for both
    y = common.photometric(x, p)
    assert not torch.allclose(y[0], y[1])


# ---------------------------------------------------------------- geometry and data path

def test_rrc_box_inside_and_in_range():
    rng = random.Random(0)
    for H, W in [(32, 32), (48, 64), (375, 500)]:
        for _ in range(500):
            t, l, h, w = common.rrc_box(H, W, (0.2, 1.0), rng=rng)
            assert 0 <= t and 0 <= l and t + h <= H and l + w <= W
            assert 0.2 * 0.9 <= h * w / (H * W) <= 1.0 + 1e-9


def test_crop_resize_identity_and_matches_pil():
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    same = common.crop_resize(img, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), 32)
    assert torch.equal(same, img.float())
    big = common.synthetic_images(1, size=96)[0]
    t, l, h, w = 10, 20, 60, 50
    dev = common.crop_resize(big, torch.tensor([[t, l, h, w]], dtype=torch.float32), 32)[0]
    pil = torchvision.transforms.functional.to_pil_image(big[0]).resize((32, 32), 2, box=(l, t, l + w, t + h))
    ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
    assert (dev - ref).abs().mean() < 6.0           # both are antialiased bilinear resizes of the same box


def test_global_batch_sampler_ranks_partition_the_single_process_batches():
    one = list(common.GlobalBatchSampler(40, 8, seed=3))
    two = [list(common.GlobalBatchSampler(40, 8, seed=3, rank=r, world=2)) for r in range(2)]
    assert len(one) == 5
    for b, (r0, r1) in enumerate(zip(*two)):
        assert r0 + r1 == one[b]
    s = common.GlobalBatchSampler(40, 8, seed=3)
    s.set_epoch(0, skip=2)
    assert list(s) == one[2:]


def test_view_dataset_is_seeded_by_seed_epoch_index():
    src = common.Source(torch.zeros(10, dtype=torch.long), images=torch.zeros(10, 3, 32, 32, dtype=torch.uint8))
    ds = common.ViewDataset(src, common.Views(common.two_views((0.2, 1)), [32, 32], [common.mocov2_recipe(False)] * 2),
                            seed=1)
    a, b = ds[3], ds[3]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["photo"], b["photo"])
    ds.epoch.fill_(1)
    assert not torch.equal(ds[3]["boxes"], a["boxes"])


def test_synthetic_is_deterministic_per_index_and_balanced():
    x, y = common.synthetic_images(20)
    x2, y2 = common.synthetic_images(5, offset=7)
    assert torch.equal(x[7:12], x2) and torch.equal(y[7:12], y2)
    assert x.dtype == torch.uint8 and x.shape == (20, 3, 32, 32)
    assert torch.bincount(y).tolist() == [2] * 10


def test_split_batch_norm_equals_per_chunk_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3)
    split = common.SplitBatchNorm(4, 2)
    plain = nn.BatchNorm2d(4)
    ref = torch.cat([plain(x[:4]), nn.BatchNorm2d(4)(x[4:])])
    assert torch.allclose(split(x), ref, atol=1e-5)   # O(1) outputs of one formula summed in another order: ~100 eps
    x1 = torch.randn(6, 5)
    split1 = common.convert_split_bn(nn.Sequential(nn.BatchNorm1d(5, affine=False)), 3)[0]
    ref1 = torch.cat([nn.BatchNorm1d(5, affine=False)(c) for c in x1.split(2)])
    assert torch.allclose(split1(x1), ref1, atol=1e-5)
    m = common.convert_split_bn(small_backbone(), 4)
    assert isinstance(m.bn1, common.SplitBatchNorm)
    assert set(m.state_dict()) == set(small_backbone().state_dict())
    moco = common.convert_split_bn(common.MoCoV2(small_backbone(), [512, 512, 128], queue_size=32), 2)
    frozen = [n for n, p in moco.encoder_k.named_parameters() if p.requires_grad]
    assert not frozen, frozen   # the EMA key encoder stays out of the optimizer, as with plain BN


def test_lars_excludes_biases_and_adapts_weights():
    torch.manual_seed(0)
    model = common.Model()  # the optimizer takes a model's param_groups()
    model.lin = lin = nn.Linear(4, 4)
    args = type("A", (), dict(optimizer="lars", lr=1.0, batch_size=256, wd=0.1, lars_eta=0.02, lars_clip=1))()
    opt = common.make_optimizer(model, args)
    groups = {g.get("lars_exclude", False): g for g in opt.param_groups}
    assert groups[True]["weight_decay"] == 0.0 and groups[True]["params"][0] is lin.bias
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.weight.grad, lin.bias.grad = torch.ones(4, 4), torch.ones(4)
    opt.step()
    trust = 0.02 * w0.norm() / (torch.ones(4, 4).norm() + 0.1 * w0.norm())
    assert torch.allclose(w0 - lin.weight, trust * (torch.ones(4, 4) + 0.1 * w0), atol=1e-6)
    assert torch.allclose(b0 - lin.bias, torch.ones(4))


def test_lr_schedule_warmup_cosine_floor():
    assert common.lr_factor(0, 10, 10, warmup_epochs=1) == pytest.approx(0.1)
    assert common.lr_factor(10, 10, 10, warmup_epochs=1) == pytest.approx(1.0)
    assert common.lr_factor(100, 10, 10) == pytest.approx(0.0)
    assert (common.lr_factor(19, 10, 4, floor=0.1, per_epoch=True)
            == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))


def test_rf_backbone_keeps_leading_3x3():
    net = common.build_backbone("resnet18", "cifar", rf_layout=[4, 4, 1, 0], rf_mlp=True)
    k = [(b.conv1.kernel_size[0], b.conv2.kernel_size[0]) for b in net.layer3]
    assert k == [(3, 1), (1, 1)]
    assert all(c.kernel_size == (1, 1) for b in net.layer4 for c in (b.conv1, b.conv2))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert common.feature_map(net, torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)


def test_knn_classify_weighted_votes():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    ranked = common.knn_classify(train, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.05], [0.05, 1.0]]), 2, k=2)
    assert ranked[:, 0].tolist() == [0, 1]


# ---------------------------------------------------------------- end to end through the CLI

FW_ARGS = {"simclr": [], "mocov2": ["--queue-size", "64"], "byol": [], "simsiam": []}
KEYS = {"method", "dataset", "epochs", "steps", "train_time_s", "images_per_s", "knn_top1", "out"}


@pytest.mark.parametrize("fw", list(FW_ARGS))
def test_cli_each_framework_then_linear_eval(fw, tmp_path):
    out = str(tmp_path / fw)
    r = run_cli("common.py", *TINY, "--framework", fw, *FW_ARGS[fw], "--epochs", "1", "--knn-every", "1", "--out", out)
    assert r.rc == 0, r.err
    assert KEYS <= set(r.json) and r.json["steps"] == 4 and r.json["method"] == fw
    assert 0 <= r.json["knn_top1"] <= 100
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert len(log) == 1 and math.isfinite(log[0]["loss"])
    if fw == "simclr":
        e = run_cli("linear_eval.py", out, "--dataset", "synthetic", "--subset", "64", "--epochs", "2", "--precompute",
                    "--batch-size", "32", "--gpus", "0")
        assert e.rc == 0, e.err
        res = e.json["runs"][out]
        assert {"linear_top1", "linear_top5", "knn_top1", "knn_top5"} <= set(res)
        assert res["knn_top1"] == pytest.approx(r.json["knn_top1"], abs=1e-3)   # same features, same kNN


@pytest.mark.parametrize("fw", ["simclr", "mocov2"])
def test_two_processes_equal_one(fw, tmp_path):
    """SimCLR (negatives gathered with gradient) and MoCo-v2 (keys gathered, shuffle-BN): from one state, a step of 2
    gloo processes on the global batch == a step of 1 process whose split-BN simulates the 2 devices (step 4: the
    MoCo queue has wrapped once)."""
    args = [*TINY, "--framework", fw, "--queue-size", "64", "--stem", "cifar", "--lr", "0.03", "--epochs", "2"]
    runs = []
    prev, one, two = last_step_both_ways("common.py", args, 4, tmp_path, results=runs)
    assert_same_update(prev, one, two)
    if fw == "mocov2":
        assert one["queue.ptr"].item() == two["queue.ptr"].item() == 0   # 4 steps x 16 keys, K = 64
        # MoCo's default --bn-splits 8 does not apply to 2 processes: said, not ignored silently
        assert "note: --bn-splits 8 applies to one process only; here each of the 2 processes normalises its own 8 " \
               "images" in runs[-1].out


def test_resume_continues_exactly(tmp_path):
    straight, parts = str(tmp_path / "straight"), str(tmp_path / "parts")
    args = [*TINY, "--framework", "mocov2", "--queue-size", "64", "--epochs", "2"]
    assert run_cli("common.py", *args, "--out", straight).rc == 0
    first = run_cli("common.py", *args, "--max-steps", "6", "--out", parts)       # stops mid-epoch 2
    assert first.rc == 0 and first.json["steps"] == 6
    with open(os.path.join(parts, "checkpoint.pth.tmp"), "wb") as f:           # a save killed half-way
        f.write(b"garbage")
    second = run_cli("common.py", *args, "--out", parts)
    assert second.rc == 0 and second.json["steps"] == 8, second.err
    a, b = (torch.load(os.path.join(d, "checkpoint.pth"), weights_only=False) for d in (straight, parts))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], abs=1e-6)


def test_backbone_pth_loads_into_plain_torchvision(tmp_path):
    out = str(tmp_path / "r")
    assert run_cli("common.py", *TINY, "--framework", "byol", "--epochs", "1", "--stem", "cifar", "--out", out).rc == 0
    ck = torch.load(os.path.join(out, "backbone.pth"), weights_only=False)
    assert ck["arch"] == "resnet18" and ck["stem"] == "cifar" and ck["method"] == "byol"
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)          # the CIFAR stem (metadata: stem=cifar)
    net.maxpool = nn.Identity()
    net.load_state_dict(ck["state_dict"], strict=True)
    trained = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)["model"]
    ours = common.build_backbone("resnet18", "cifar")
    ours.load_state_dict({k[len("online.backbone."):]: v for k, v in trained.items()
                          if k.startswith("online.backbone.")})
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(net.eval()(x), ours.eval()(x), atol=1e-6)


def test_nonfinite_loss_stops_with_a_clear_message():
    with pytest.raises(common.UserError, match="NaN or inf"):
        common.check_finite(torch.tensor(True), 7, "x/checkpoint.pth")


@requires_cifar_mini
def test_real_data_short_run(tmp_path):
    out = str(tmp_path / "real")
    r = run_cli("common.py", "--framework", "simclr", "--dataset", "folder", "--data", str(CIFAR_MINI),
                "--stem", "imagenet", "--batch-size", "32", "--epochs", "1", "--max-steps", "3", "--gpus", "0",
                "--out", out)
    assert r.rc == 0, r.err
    assert "10000 images" in r.out
    assert r.json["knn_top1"] > 20      # 10 classes; real features (even barely trained) are far above chance


# ---------------------------------------------------------------- user errors: one line, no traceback

def _one_line_error(r, *words):
    assert r.rc != 0
    lines = [l for l in r.err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs(tmp_path):
    _one_line_error(run_cli("common.py", "--dataset", "folder", "--data", str(tmp_path / "nope")), "does not exist")
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    _one_line_error(run_cli("common.py", "--dataset", "folder", "--data", str(empty)), "no images")
    bad = tmp_path / "bad" / "train" / "cat"
    bad.mkdir(parents=True)
    torchvision.transforms.functional.to_pil_image(torch.zeros(3, 8, 8)).save(bad / "ok.png")
    (bad / "broken.png").write_bytes(b"not an image")
    _one_line_error(run_cli("common.py", "--dataset", "folder", "--data", str(tmp_path / "bad")), "broken.png")
    _one_line_error(run_cli("common.py", *TINY, "--gpus", "4"), "--gpus 4")
    _one_line_error(run_cli("common.py", "--dataset", "imagenet-21k"), "unknown dataset")
    r50 = tmp_path / "r50.pth"
    common.export_backbone(common.build_backbone("resnet50", "imagenet"), str(r50), method="x", dataset="y", epoch=0)
    _one_line_error(run_cli("linear_eval.py", str(r50), "--dataset", "synthetic", "--arch", "resnet18", "--knn-only"),
                    "resnet50")


# ---------------------------------------------------------------- dataset layouts

def _args(**kw):
    base = dict(dataset="folder", data=".", download=False, class_list=None, subset=0)
    return type("A", (), {**base, **kw})()


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.transforms.functional.to_pil_image(torch.full((3, 64, 64), value, dtype=torch.uint8)).save(path)


def test_tinyimagenet_original_layout(tmp_path):
    for i, wnid in enumerate(["n01", "n02"]):
        for j in range(2):
            _png(tmp_path / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", 10 * i + j)
    for f in ["val_0.JPEG", "val_1.JPEG"]:
        _png(tmp_path / "val" / "images" / f, 99)
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t1\t1\nval_1.JPEG\tn01\t0\t0\t1\t1\n")
    d = common.load_data(_args(dataset="tinyimagenet", data=str(tmp_path)))
    assert d.train.in_memory and d.train.images.shape == (4, 3, 64, 64)
    assert d.train.labels.tolist() == [0, 0, 1, 1] and d.knn_val.labels.tolist() == [1, 0]


def test_flat_folder_trains_without_labels(tmp_path):
    for j in range(3):
        _png(tmp_path / f"img{j}.png", j)
    d = common.load_data(_args(data=str(tmp_path)))
    assert len(d.train) == 3 and d.knn_val is None and not d.train.has_labels


def test_missing_torchvision_dataset_says_what_to_pass(tmp_path):
    with pytest.raises(common.UserError, match="--download"):
        common.load_data(_args(dataset="cifar10", data=str(tmp_path)))


def test_linear_eval_compares_several_runs(tmp_path):
    paths = []
    for n in ("a", "b"):
        torch.manual_seed(len(n) + ord(n))
        paths.append(str(tmp_path / f"{n}.pth"))
        common.export_backbone(common.build_backbone("resnet18", "imagenet"), paths[-1], method=n, dataset="synthetic",
                               epoch=0)
    r = run_cli("linear_eval.py", *paths, "--dataset", "synthetic", "--subset", "200", "--knn-only", "--gpus", "0",
                "--out", str(tmp_path))
    assert r.rc == 0, r.err
    assert set(r.json["runs"]) == set(paths) and "| run | linear_top1" in r.out
    assert os.path.getsize(tmp_path / "comparison.png") > 0


def test_show_views_without_training(tmp_path):
    import matplotlib.image as mpimg
    out = str(tmp_path / "v")
    r = run_cli("common.py", *TINY, "--framework", "byol", "--show-views", "--out", out)
    assert r.rc == 0 and r.json["views"].endswith("views.png")
    img = mpimg.imread(os.path.join(out, "views.png"))
    assert img.shape[0] > 400 and img.shape[1] > 300 and img.std() > 0.05       # 4 rows of source + 2 views
    assert not os.path.exists(os.path.join(out, "checkpoint.pth"))


def test_losses_stay_fp32_under_autocast():
    torch.manual_seed(0)
    q, queue = (torch.nn.functional.normalize(torch.randn(n, 8), dim=1) for n in (4, 16))
    ref = (common.info_nce(q, q, queue, 0.2), common.nt_xent(q, queue[:4], 0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = (common.info_nce(q, q, queue, 0.2), common.nt_xent(q, queue[:4], 0.5))
    for a, b in zip(ref, low):
        assert b.dtype == torch.float32 and a.item() == b.item()


def test_folder_subset_spans_every_class(tmp_path):
    for c in range(3):
        for j in range(4):
            _png(tmp_path / "train" / f"class{c}" / f"{j}.png", 10 * c + j)
    d = common.load_data(_args(data=str(tmp_path), subset=3))
    assert sorted(d.train.labels.tolist()) == [0, 1, 2] and d.train.images.shape[0] == 3


# ---------------------------------------------------------------- tests/gpu_check.py (its --cpu-smoke: ~2 min)

def test_gpu_check_table_shows_targets_and_problems(capsys):
    import gpu_check
    row = dict(data="synthetic jpeg", ips=None, peak_gib=None, syncs=None, wait=None, sources=[], error=None)
    table = gpu_check.format_table([
        {**row, "entry": "mocov2", "ips": 2712.4, "peak_gib": 21.04, "syncs": 0.0, "wait": 0.031},
        {**row, "entry": "logo", "ips": 900.0, "syncs": 2.0, "sources": [("common.py:1130", 80)]},
        {**row, "entry": "clim", "error": "OutOfMemoryError: CUDA out of memory"}])
    lines = table.splitlines()
    assert lines[2] == "| mocov2 | synthetic jpeg | 2712 ok | 2500 | 21.0 | 0.00 ok | 0 | 3% |"
    assert lines[3] == "| logo | synthetic jpeg | 900 | n/a | n/a | 2.00 HIGH | 0 | n/a |"
    assert "logo (synthetic jpeg): syncs from common.py:1130 x80" in lines
    assert lines[-1].startswith("clim (synthetic jpeg): FAILED")
    if not torch.cuda.is_available():  # without a GPU it says so in one line and succeeds
        assert gpu_check.main([]) == 0 and len(capsys.readouterr().out.strip().splitlines()) == 1


class _SlowDownload:
    """A torchvision-like dataset whose download takes a while: a second process that does not wait for the first
    finds no files and downloads too."""
    def __init__(self, root, download=False):
        done = os.path.join(root, "done")
        if download and not os.path.exists(done):
            with open(os.path.join(root, f"downloaded-by-{torch.distributed.get_rank()}"), "w"):
                pass
            time.sleep(1.0)
            open(done, "w").close()
        if not os.path.exists(done):
            raise RuntimeError("Dataset not found. You can use download=True to download it")


def _download_in_two(rank, port, root):
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    common._tv(_SlowDownload, "SLOW", "done", root=root, download=True)
    torch.distributed.destroy_process_group()


def test_download_runs_in_rank_0_while_the_others_wait(tmp_path):
    from conftest import free_port
    torch.multiprocessing.spawn(_download_in_two, args=(free_port(), str(tmp_path)), nprocs=2)
    assert sorted(os.listdir(tmp_path)) == ["done", "downloaded-by-0"]


def test_progress_lines_come_at_least_every_30_seconds(capsys):
    """5 steps took 7.3 s: with --log-every 50 the next line comes after 20 steps (30 s), not 50; a first line
    estimates the epoch's time (100 steps of 8 images at 5.5 img/s: 2 min 26 s)."""
    args = SimpleNamespace(batch_size=8, log_every=50, device=torch.device("cpu"), epochs=1)
    r = SimpleNamespace(args=args, bad=torch.tensor(False), step=5, ckpt="", t_log=time.time() - 7.3, train_time=0.0,
                        sums={"loss": torch.tensor(5.0)}, spe=100, total=100, data_wait=[0.0], steps_log=5, every=2,
                        opt=SimpleNamespace(param_groups=[{"lr": 0.1}]))
    common.log_progress(r, 0)
    assert r.every == 20 and r.next_log == 25
    out = capsys.readouterr().out
    assert re.search(r"first steps: 5\.5 img/s, about 0:02:2\d an epoch", out) and "step 5/100 loss 1.0000" in out
    r.t_log, r.steps_log, r.step = time.time() - 1, 20, 25  # fast steps: back to --log-every
    common.log_progress(r, 0)
    assert r.every == 50 and "first steps" not in capsys.readouterr().out
