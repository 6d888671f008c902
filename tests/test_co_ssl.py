"""Tests of co_ssl.py: the method (losses, heads, views, the family, robustness) and the CLI contract."""
import io, json, math, os, warnings
from types import SimpleNamespace

import matplotlib.image as mpimg
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import co_ssl
from conftest import TINY, assert_same_update, last_step_both_ways, run_cli, without

approx = pytest.approx
# Runs of a bounded-RF trunk with a real 4x4 grid: CIFAR stem at 32 px, 2 steps of 8 images, split-BN over 2 "GPUs".
RF_RUN = [*TINY, "--subset", "16", "--batch-size", "8", "--stem", "cifar", "--arch", "rf_resnet18", "--bn-splits", "2",
          "--lr", "0.1", "--epochs", "1"]


def small_model(local_weight=0.3, arch="resnet18", **kw):
    """A CO-BYOL with narrow heads: ImageNet stem, so 64 px views give a 2x2 grid."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trunk = co_ssl.build_trunk(arch, "imagenet")
    return co_ssl.COBYOL(trunk, pred_hidden=64, local_weight=local_weight, proj_hidden=64, dim=32, **kw)


def two_views(size=64, batch=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]


def vec(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- 1-3: the losses at constructed inputs

def test_1_distance_values():
    d = lambda a, b: co_ssl.byol_distance(vec(a), vec(b)).item()
    assert d((1, 0), (0, 1)) == approx(2) and d((1, 0), (-1, 0)) == approx(4)
    assert d((1, 0), (2, 0)) == approx(0, abs=1e-7) and d((1, 0), (1, 1)) == approx(2 - math.sqrt(2))


def test_2_local_loss_pairs_other_view_and_averages_positions():
    P1 = vec((0, 1)).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    P2 = vec((1, 0), (0, 1), (-1, 0), (1, 1)).T.reshape(1, 2, 2, 2)       # positions (0,0) (0,1) (1,0) (1,1)
    t1, t2 = vec((1, 0)), vec((0, 3))
    loss_local = co_ssl.local_loss(P1, P2, t1, t2)
    assert loss_local.item() == approx((8 - math.sqrt(2)) / 4, abs=1e-6)   # 1.646447
    assert co_ssl.local_loss(P1, P2, t2, t1).item() == approx(3.146447, abs=1e-6)   # the wrong pairing differs
    summed = co_ssl.local_distance(P1, t2).sum() + co_ssl.local_distance(P2, t1).sum()
    assert summed.item() == approx(6.585786, abs=1e-6)
    loss_global = co_ssl.global_loss(vec((1, 0)), vec((1, 0)), vec((1, 0)), vec((0, 1)))
    assert loss_global.item() == approx(2, abs=1e-6)
    assert co_ssl.co_ssl_loss(loss_global, loss_local, 0.3).item() == approx(1.893934, abs=1e-6)


def test_3_invariances():
    torch.manual_seed(0)
    P1, P2, t1, t2 = torch.randn(3, 8, 2, 2), torch.randn(3, 8, 2, 2), torch.randn(3, 8), torch.randn(3, 8)
    ref = co_ssl.local_loss(P1, P2, t1, t2)
    assert co_ssl.local_loss(7 * P1, 7 * P2, 0.5 * t1, 0.5 * t2).item() == approx(ref.item(), abs=1e-6)
    model = small_model()
    x1, x2 = two_views()
    assert model([x1, x2])[0].item() == approx(model([x2, x1])[0].item(), abs=1e-5)


# ---------------------------------------------------------------- 4-6: reduction to BYOL, gradient flow, 1x1 heads

def test_4_local_weight_0_is_common_byol():
    mine = small_model(local_weight=0)
    assert not [k for k in mine.state_dict() if "local" in k]             # no g2, q2, g2_xi
    ref = common.BYOL(common.build_backbone("resnet18", "imagenet"), [512, 64, 32], 64)
    names = {"online.trunk.": "online.backbone.", "online.projector.": "online.head.",
             "target.trunk.": "target.backbone.", "target.projector.": "target.head."}
    sd = {}
    for k, v in mine.state_dict().items():
        for a, b in names.items():
            k = k.replace(a, b)
        sd[k] = v
    ref.load_state_dict(sd)                                                # same weights; target = online
    views = two_views(32)
    loss, logs = mine(views)
    loss_ref, _ = ref(views)
    assert loss.item() == approx(loss_ref.item() + 4, abs=1e-5) and set(logs) == {"loss_global"}
    loss.backward()
    loss_ref.backward()
    pairs = list(zip(mine.online.parameters(), ref.online.parameters())) + list(zip(mine.predictor.parameters(),
                                                                                    ref.predictor.parameters()))
    assert len(pairs) == len([p for p in ref.parameters() if p.requires_grad])
    assert all(torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4) for a, b in pairs)


def test_4_baseline_flag_builds_no_local_heads(tiny):
    args, data = tiny
    base = co_ssl.parse(TINY + ["--baseline", "--local-weight", "0.5"])
    assert base.local_weight == 0
    model = co_ssl.build(base, data).model
    assert not [k for k in model.state_dict() if "local" in k]


def test_5_gradient_flow():
    model = small_model()
    x1, x2 = two_views()
    fmaps = [torch.randn(4, 512, 3, 3, requires_grad=True) for _ in range(2)]
    (p1, P1), (p2, P2) = model.predict(fmaps[0]), model.predict(fmaps[1])
    (z1, t1), (z2, t2) = model.targets(x1), model.targets(x2)
    assert t1.grad_fn is None and z1.grad_fn is None and not t1.requires_grad
    assert not torch.equal(t1, z1)                                        # reading A: t = g2_xi(y'), not z'
    glob = list(model.online.projector.parameters()) + list(model.predictor.parameters())
    local = list(model.online.local_projector.parameters()) + list(model.local_predictor.parameters())
    grads = torch.autograd.grad(co_ssl.local_loss(P1, P2, t1, t2), fmaps + glob + local, allow_unused=True,
                                retain_graph=True)
    for g in grads[:2]:
        assert (g.abs().sum((0, 1)) > 0).all()                             # every (i, j) receives a gradient
    assert all(g is None for g in grads[2:2 + len(glob)]) and all(g is not None for g in grads[2 + len(glob):])
    grads = torch.autograd.grad(co_ssl.global_loss(p1, p2, z1, z2), glob + local, allow_unused=True)
    assert all(g is not None for g in grads[:len(glob)]) and all(g is None for g in grads[len(glob):])
    model(two_views())[0].backward()
    assert all(p.grad is None for p in model.target.parameters())
    reading_b = small_model(local_target="global")
    z, t = reading_b.targets(x1)
    assert torch.equal(z, t)


def test_6_conv_heads_equal_linear_heads():
    torch.manual_seed(0)
    conv = co_ssl.conv_mlp([16, 24, 8]).eval()
    bn = conv[1]
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.data.normal_(), bn.bias.data.normal_()
    lin = nn.Sequential(nn.Linear(16, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 8)).eval()
    for c, l in [(conv[0], lin[0]), (conv[3], lin[3])]:
        l.weight.data, l.bias.data = c.weight.data.flatten(1).clone(), c.bias.data.clone()
    lin[1].load_state_dict(bn.state_dict())
    x = torch.randn(2, 16, 3, 5)
    ref = lin(x.permute(0, 2, 3, 1).reshape(-1, 16)).view(2, 3, 5, 8).permute(0, 3, 1, 2)
    assert torch.allclose(conv(x), ref, atol=1e-5)
    v = torch.randn(2, 16)
    assert torch.allclose(conv(v[:, :, None, None]).flatten(1), lin(v), atol=1e-5)


# ---------------------------------------------------------------- 7-10: shapes, receptive fields, parameter counts

@pytest.mark.parametrize("arch,stem,size,grid,fmap,P", [
    ("rf_resnet50", "imagenet", 224, 0, (2, 2048, 7, 7), (2, 256, 7, 7)),
    ("resnet18", "cifar", 32, 0, (2, 512, 4, 4), (2, 256, 4, 4)),
    ("resnet18", "cifar", 64, 0, (2, 512, 8, 8), (2, 256, 8, 8)),
    ("resnet18", "cifar", 64, 2, (2, 512, 8, 8), (2, 256, 2, 2))])
def test_7_shapes(arch, stem, size, grid, fmap, P):
    with torch.device("meta"):                                             # shapes only: no compute
        model = co_ssl.COBYOL(co_ssl.build_trunk(arch, stem), 4096, local_grid=grid)
        x = torch.empty(2, 3, size, size)
        F_ = common.feature_map(model.backbone, x)
        p, P_ = model.predict(F_)
        z, t = model.targets(x)
    assert tuple(F_.shape) == fmap and tuple(P_.shape) == P and p.shape == z.shape == t.shape == (2, 256)


@pytest.mark.parametrize("arch,stem,rf,stride", [("resnet50", "imagenet", 427, 32), ("rf_resnet50", "imagenet", 99, 32),
                                                 ("resnet18", "cifar", 109, 8), ("rf_resnet18", "cifar", 29, 8)])
def test_8_receptive_field_analytic(arch, stem, rf, stride):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("error")                                     # the paper's pairings do not warn
        assert co_ssl.receptive_field(co_ssl.build_trunk(arch, stem)) == (rf, stride)


def test_8_other_pairing_warns():
    with torch.device("meta"), pytest.warns(UserWarning, match="receptive field of 115 px"):
        trunk = co_ssl.build_trunk("rf_resnet18", "imagenet")
    assert co_ssl.receptive_field(trunk) == (115, 32)


def grad_support(trunk, size, cell, dtype=torch.float64):
    """Rows and columns of the input that reach F[0, :, cell, cell] (eval, BN weights 1)."""
    trunk = trunk.to(dtype).eval()
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    x = torch.randn(1, 3, size, size, dtype=dtype, requires_grad=True)
    common.feature_map(trunk, x)[0, :, cell, cell].sum().backward()
    g = x.grad[0].abs().sum(0)
    rows, cols = g.sum(1).nonzero().flatten(), g.sum(0).nonzero().flatten()
    return (rows.min().item(), rows.max().item()), (cols.min().item(), cols.max().item())


def test_9_receptive_field_by_gradient():
    torch.manual_seed(0)
    trunk = co_ssl.build_trunk("rf_resnet18", "cifar")
    rf, stride, pad = co_ssl.rf_geometry(trunk)
    assert (4 * stride - pad, 4 * stride - pad + rf - 1) == (18, 46)
    assert grad_support(trunk, 64, 4) == ((18, 46), (18, 46))
    # rf_resnet50, cell (3, 3): 160 px instead of 224 (the box 47..145 fits either way; 2x less CPU time)
    trunk = co_ssl.build_trunk("rf_resnet50", "imagenet")
    box = co_ssl.rf_geometry(trunk)
    assert (3 * box[1] - box[2], 3 * box[1] - box[2] + box[0] - 1) == (47, 145)
    maxpool, trunk.maxpool = trunk.maxpool, nn.AvgPool2d(3, 2, 1)        # every window position passes gradient
    assert grad_support(trunk, 160, 3) == ((47, 145), (47, 145))
    trunk.maxpool = maxpool                                               # the real max-pool: a subset of the box
    (r0, r1), (c0, c1) = grad_support(trunk, 160, 3, torch.float32)
    assert 47 <= r0 <= r1 <= 145 and 47 <= c0 <= c1 <= 145


def test_10_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        r50, rf50, rf18 = (co_ssl.build_trunk(a, s) for a, s in
                           [("resnet50", "imagenet"), ("rf_resnet50", "imagenet"), ("rf_resnet18", "cifar")])
    assert count(r50) == 23_508_032
    assert (count(rf50) - count(rf50.fc), count(rf50.fc), count(rf50)) == (14_824_512, 8_396_800, 23_221_312)
    assert (count(rf18) - count(rf18.fc), count(rf18.fc)) == (2_255_936, 526_336)


# ---------------------------------------------------------------- 11-14: EMA, optimizer groups, heat maps, round trip

def test_11_ema():
    assert co_ssl.ema_tau(0) == approx(0.99) and co_ssl.ema_tau(0.5) == approx(0.995) and co_ssl.ema_tau(1) == approx(1)
    model = small_model(arch="rf_resnet18")
    with torch.no_grad():
        for p in model.online.parameters():
            p.fill_(1)
        for p in model.target.parameters():
            p.zero_()
    model.progress = 0.0
    model.after_step()
    t = model.target
    for p in [t.trunk.conv1.weight, t.trunk.fc[0].weight, t.projector[0].weight, t.local_projector[0].weight]:
        assert torch.allclose(p, torch.full_like(p, 0.01))                 # trunk, MLP, g, g2
    assert not [k for k in model.state_dict() if k.startswith("target.") and "predictor" in k]


def test_12_lars_groups():
    model = small_model(arch="rf_resnet18")
    args = SimpleNamespace(lr=1.0, batch_size=256, optimizer="lars", wd=1e-5, lars_eta=0.02, lars_clip=1)
    opt = common.make_optimizer(model, args)
    ids = lambda ps: {id(p) for p in ps}
    excluded = ids(p for g in opt.param_groups if g["lars_exclude"] for p in g["params"])
    adapted = ids(p for g in opt.param_groups if not g["lars_exclude"] for p in g["params"])
    online = [p for p in model.parameters() if p.requires_grad]
    assert excluded == ids(p for p in online if p.ndim <= 1) and adapted == ids(p for p in online if p.ndim > 1)
    assert all(g["weight_decay"] == 0 for g in opt.param_groups if g["lars_exclude"])
    one_d = [model.online.local_projector[1].weight, model.online.local_projector[0].bias,
             model.local_predictor[1].bias, model.local_predictor[3].bias, model.online.trunk.fc[1].weight]
    assert ids(one_d) <= excluded
    assert not ids(model.target.parameters()) & (excluded | adapted)


def test_13_heat_map_matches_local_loss():
    model = small_model().eval()
    views = two_views()
    maps = model.heat_maps(views)
    (_, P1, _, t1), (_, P2, _, t2) = model.passes(views)
    loss, logs = model(views)
    for m, P, t in [(maps[0], P1, t2), (maps[1], P2, t1)]:
        assert m.shape == (4, 2, 2) and m.min() >= -1 and m.max() <= 1
        assert torch.allclose(m, F.cosine_similarity(P, t[:, :, None, None], dim=1), atol=1e-6)
    assert (maps[0].mean() + maps[1].mean()).item() == approx(2 - logs["loss_local"].item() / 2, abs=1e-5)


@pytest.fixture(scope="module")
def tiny():
    args = co_ssl.parse(TINY + ["--epochs", "1", "--pred-hidden", "256"])
    args.device = torch.device("cpu")
    data = common.load_data(args)
    common.resolve_data(args, data)
    return args, data


def test_14_round_trip(tiny):
    args, data = tiny

    def fresh():
        common.seed_everything(0)
        model = co_ssl.build(args, data).model
        return model, common.make_optimizer(model, args)

    setup = co_ssl.build(args, data)
    ds = common.ViewDataset(data.train, setup.views, args.seed)
    batches = [torch.utils.data.default_collate([ds[i] for i in range(k * 16, k * 16 + 16)]) for k in range(3)]

    def step(model, opt, k):
        model.progress = k / 4
        views = common.device_views(batches[k], data.train.images, data.mean, data.std, setup.views.sizes, args.device)
        loss, _ = model(views, batches[k])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step()
        return loss.item()

    model, opt = fresh()
    step(model, opt, 0), step(model, opt, 1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    model2, opt2 = fresh()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert step(model, opt, 2) == step(model2, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.target.parameters(), model2.target.parameters()))


# ---------------------------------------------------------------- the command line, end to end

@pytest.fixture(scope="module")
def rf_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("co_ssl") / "rf")
    return out, run_cli("co_ssl.py", *RF_RUN, "--out", out)


def test_cli_method_end_to_end(rf_run):
    out, r = rf_run
    assert r.rc == 0, r.err
    assert set(r.json) >= {"method", "dataset", "epochs", "steps", "train_time_s", "images_per_s", "knn_top1", "out"}
    assert (r.json["method"], r.json["steps"], r.json["out"]) == ("co_ssl", 2, out)
    assert "receptive field 29 px at stride 8; 4x4 local representations" in r.out
    log = json.loads(open(os.path.join(out, "log.jsonl")).readline())
    assert {"loss", "loss_global", "loss_local", "tau"} <= set(log)
    assert log["loss"] == approx(0.7 * log["loss_global"] + 0.3 * log["loss_local"], rel=1e-5)
    net, meta = common.load_backbone(out)                                 # what linear_eval.py does, no co_ssl import
    assert (meta["arch"], meta["stem"], meta["rf_layout"], meta["rf_mlp"]) == ("resnet18", "cifar", [4, 4, 1, 0], True)
    assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_cli_baseline(tmp_path):
    r = run_cli("co_ssl.py", *TINY, "--subset", "32", "--epochs", "1", "--baseline", "--out", tmp_path / "b")
    assert r.rc == 0, r.err
    assert (r.json["method"], r.json["steps"]) == ("co_ssl-baseline", 2)
    model = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)["model"]
    assert model and not [k for k in model if "local" in k]
    assert "loss_local" not in json.loads(open(tmp_path / "b" / "log.jsonl").readline())


def test_cli_resume_is_exact(rf_run, tmp_path):
    out = str(tmp_path / "r")
    r = run_cli("co_ssl.py", *RF_RUN, "--out", out, "--max-steps", "1")
    assert r.rc == 0 and r.json["steps"] == 1, r.err
    other = co_ssl.parse(RF_RUN + ["--out", out, "--local-weight", "0.5"])          # a method-defining flag changed
    with pytest.raises(common.UserError, match="--local-weight 0.3 \\(now 0.5\\)"):
        common.load_checkpoint(os.path.join(out, "checkpoint.pth"), other, "co_ssl", 2)
    r = run_cli("co_ssl.py", *RF_RUN, "--out", out)
    assert r.rc == 0 and r.json["steps"] == 2, r.err
    load = lambda d: torch.load(os.path.join(d, "checkpoint.pth"), weights_only=False)["model"]
    a, b = load(out), load(rf_run[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_two_processes_equal_one_with_split_bn(tmp_path):
    args = without(RF_RUN, "--bn-splits")
    assert_same_update(*last_step_both_ways("co_ssl.py", args, 2, tmp_path))


def test_cli_show_views_with_checkpoint(rf_run):
    out, _ = rf_run
    r = run_cli("co_ssl.py", *RF_RUN, "--out", out, "--show-views")
    assert r.rc == 0, r.err
    assert r.json["checkpoint"] == os.path.join(out, "checkpoint.pth")
    assert all(-1 <= m <= 1 for m in r.json["mean_local_cos"])
    assert mpimg.imread(r.json["views"]).shape == (1240, 1000, 4)   # 6 rows x 5 panels of 2 in + title, 100 dpi


def test_show_views_without_checkpoint(tiny, tmp_path):
    args, data = tiny
    args = SimpleNamespace(**{**vars(args), "out": str(tmp_path), "ckpt": None})
    setup = co_ssl.build(args, data)
    info = co_ssl.show_views(args, data, setup, str(tmp_path / "views.png"))
    assert info == {"checkpoint": None, "mean_local_cos": None}
    assert mpimg.imread(str(tmp_path / "views.png")).shape == (1240, 1000, 4)
    with pytest.raises(common.UserError, match="--shared-head and --local-target are CO-BYOL ablations"):
        co_ssl.build(SimpleNamespace(**{**vars(args), "framework": "dino", "shared_head": True}), data)


# ---------------------------------------------------------------- the family: CO-MoCoV3 and CO-DINO

def test_family_contrast_closed_form_and_local_queries():
    """Unit queries equal to their keys, tau 0.5: logits [[2, 0], [0, 2]], so each row's InfoNCE is ln(1 + e^-2),
    times MoCo v3's 2 tau = 1. Every position of a map holding the global query gives the same value."""
    q = vec([1, 0], [0, 1])
    assert co_ssl.contrast(q, q, 0.5).item() == approx(math.log(1 + math.exp(-2)), rel=1e-6)
    assert co_ssl.contrast(3 * q, q, 0.5).item() == approx(math.log(1 + math.exp(-2)), rel=1e-6)  # normalised
    Q = q[:, :, None, None].expand(2, 2, 3, 3)
    assert co_ssl.contrast(Q, q, 0.5).item() == approx(co_ssl.contrast(q, q, 0.5).item(), rel=1e-6)
    swapped = co_ssl.contrast(q, q.flip(0), 0.5).item()                     # the positive is the other key
    assert swapped == approx(math.log(1 + math.exp(2)), rel=1e-6)


def test_family_dino_cross_entropy_centres_and_sharpens():
    """K = 2, student [1, 0] at tau_s 1: log softmax = [1 - L, -L] with L = ln(1 + e). A teacher [2, 0] centred by
    [1, -1] is [1, 1]: uniform whatever tau_t, so H = L - 1/2. Uncentred and sharp (tau_t 0.01) it is one-hot on
    prototype 0: H = L - 1."""
    L = math.log(1 + math.e)
    s, t = vec([1, 0]), vec([2, 0])
    assert co_ssl.dino_cross_entropy(s, t, vec([1, -1]), 1.0, 0.04).item() == approx(L - 0.5, rel=1e-6)
    assert co_ssl.dino_cross_entropy(s, t, torch.zeros(2), 1.0, 0.01).item() == approx(L - 1, rel=1e-5)
    S = s[:, :, None, None].expand(1, 2, 2, 2)                               # every position: the same value
    assert co_ssl.dino_cross_entropy(S, t, vec([1, -1]), 1.0, 0.04).item() == approx(L - 0.5, rel=1e-6)


def family_model(fw, local_weight=0.3):
    torch.manual_seed(0)
    trunk = co_ssl.build_trunk("resnet18", "imagenet")
    if fw == "mocov3":
        return co_ssl.COMoCoV3(trunk, pred_hidden=64, local_weight=local_weight, proj_hidden=64, dim=32)
    return co_ssl.CODINO(trunk, local_weight=local_weight, prototypes=16, hidden=64, dim=32)


@pytest.mark.parametrize("fw", ["mocov3", "dino"])
def test_family_loss_is_the_weighted_sum_and_local_weight_0_is_the_base(fw):
    views = two_views()
    model = family_model(fw)
    loss, logs = model(views)
    assert loss.item() == approx(0.7 * logs["loss_global"].item() + 0.3 * logs["loss_local"].item(), rel=1e-5)
    base = family_model(fw, local_weight=0)
    loss0, logs0 = base(views)
    assert "loss_local" not in logs0 and loss0.item() == approx(logs0["loss_global"].item())
    assert not [n for n, _ in base.named_parameters() if "local" in n]
    loss.backward()                                       # the local heads learn; the target never gets gradients
    local = [p for n, p in model.named_parameters() if "local" in n]
    assert local and all(p.grad is not None for p in local)
    assert all(p.grad is None for p in model.target.parameters())


def test_family_dino_centre_follows_the_teacher_and_is_checkpointed():
    model = family_model("dino")
    views = two_views()
    with torch.no_grad():
        t = torch.cat([model.teacher(v) for v in views])
    model(views)
    torch.testing.assert_close(model.center, 0.1 * t.mean(0))                # from 0 with momentum 0.9
    assert "center" in model.state_dict()


@pytest.mark.parametrize("fw", ["mocov3", "dino"])
def test_family_cli_resume_two_processes_and_show_views(fw, tmp_path):
    args = [*RF_RUN, "--framework", fw]
    full = run_cli("co_ssl.py", *args, "--out", tmp_path / "full")
    assert full.rc == 0 and (full.json["method"], full.json["framework"]) == (f"co_ssl-{fw}", fw), full.err[-3000:]
    prev, one, two = last_step_both_ways("co_ssl.py", without(args, "--bn-splits"), 2, tmp_path / "ddp")
    assert_same_update(prev, one, two)
    a, b = one, torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # one = 1 step, resumed for the 2nd
    r = run_cli("co_ssl.py", *args, "--out", tmp_path / "full", "--show-views")
    assert r.rc == 0 and all(-1 <= m <= 1 for m in r.json["mean_local_cos"]), r.err[-3000:]
    base = run_cli("co_ssl.py", *TINY, "--subset", "32", "--epochs", "1", "--framework", fw, "--baseline",
                   "--out", tmp_path / "b")
    assert base.rc == 0 and base.json["method"] == f"co_ssl-{fw}-baseline", base.err[-3000:]
