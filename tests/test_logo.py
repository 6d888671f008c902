"""Tests of logo.py: losses at closed-form points, views, affinity isolation and signs,
queue/EMA, resume, the CLI end to end, and 2 processes against 1."""
import copy, io, json, math, os
from contextlib import redirect_stdout

import matplotlib.image as mpimg
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, assert_same_update, last_step_both_ways, run_cli
import common
import logo

B = 4
_IMGS = common.synthetic_images(B)


def make(framework="simsiam", *flags, batch=B):
    """parse + build on B in-memory synthetic images (ImageNet stem: cheap on CPU)."""
    args = logo.parse(["--dataset", "synthetic", "--stem", "imagenet", "--batch-size", str(batch), "--gpus", "0",
                       "--framework", framework, *flags])
    args.device = torch.device("cpu")
    data = common.Data(common.Source(_IMGS[1], images=_IMGS[0]), None, None, *common.DATASETS["synthetic"]["stats"])
    torch.manual_seed(0)
    return args, logo.build(args, data)


def rand_views(n=4, size=16):  # 16 px through the ImageNet stem: layer4 is 1 x 1, cheap
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, 3, size, size, generator=g) for _ in range(n)]


def unit(rows):
    return F.normalize(torch.as_tensor(rows, dtype=torch.float32), dim=1)


def run_main(argv):
    """logo.main in this process (no interpreter start); returns the last stdout line as JSON."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        logo.main([str(a) for a in argv])
    return json.loads(buf.getvalue().strip().splitlines()[-1])


# ---------------------------------------------------------------- 1. views

@pytest.mark.parametrize("dataset,side,blur", [("cifar10", 32, (0, 0)), ("cifar100", 32, (0, 0)),
                                               ("stl10", 96, (0.5, 0)), ("tinyimagenet", 64, (0, 0)),
                                               ("imagenet100", 256, (0.5, 0.5)), ("imagenet", 256, (0.5, 0.5)),
                                               ("folder", 64, (0, 0))])
def test_view_shapes_per_dataset(dataset, side, blur):
    args = logo.parse(["--dataset", dataset])
    like = dataset if dataset != "folder" else "tinyimagenet"  # a folder of 64 px images (common.folder_like)
    views = logo.view_plan(args, like)
    sizes, recipes = views.sizes, views.recipes
    G, L = logo.SIZES[like]
    assert sizes == [G, G, L, L] and [r.p_blur for r in recipes] == [blur[0]] * 2 + [blur[1]] * 2
    assert all(r.p_solarize == 0 and r.jitter == (0.4, 0.4, 0.4, 0.1) and r.p_gray == 0.2 for r in recipes)
    imgs = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8)
    ds = common.ViewDataset(common.Source([0, 1], images=imgs), views, seed=0)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    views = common.device_views(batch, imgs, (0.5,) * 3, (0.25,) * 3, sizes, torch.device("cpu"))
    assert [tuple(v.shape) for v in views] == [(2, 3, G, G)] * 2 + [(2, 3, L, L)] * 2
    base_args = logo.parse(["--dataset", dataset, "--baseline"])
    base_sizes = logo.view_plan(base_args, like).sizes
    assert base_sizes == [G, G]


def test_box_areas_within_scales():
    views_fn = logo.LoGoViews((0.4, 1.0), (0.05, 0.4))
    for side, tol in ((1000, 0.002), (32, 0.04)):
        areas = torch.tensor([[h * w / side ** 2
                               for _, _, h, w, _, _ in views_fn(i, [(side, side)], common.sample_rng(0, 0, i))]
                              for i in range(300)])
        assert areas[:, :2].min() >= 0.4 - tol and areas[:, :2].max() <= 1.0
        # locals never fall back to the full image
        assert areas[:, 2:].min() >= 0.05 - tol and areas[:, 2:].max() <= 0.4 + tol
        assert areas[:, 2:].std() > 0.05 and areas[:, :2].mean() > areas[:, 2:].mean() + 0.3


# ---------------------------------------------------------------- 2-4. affinity net, closed form, derangement

@pytest.mark.parametrize("dim", [128, 2048])
def test_affinity_shapes_and_unit_inputs(dim):
    tr = logo.AffinityTrainer(dim)
    a, b = F.normalize(torch.randn(B, dim), dim=1), F.normalize(torch.randn(B, dim), dim=1)
    perm = logo.derangement(B)
    x, y = logo.affinity_batch(a, b, perm)
    assert x.shape == (4 * B, 2 * dim) and y.tolist() == [1.0] * 2 * B + [0.0] * 2 * B
    assert (torch.allclose(x[:, :dim].norm(dim=1), torch.ones(4 * B))
            and torch.allclose(x[:, dim:].norm(dim=1), torch.ones(4 * B)))
    assert torch.equal(x[B + 1], torch.cat([b[1], a[1]])) and torch.equal(x[2 * B + 1], torch.cat([a[1], b[perm[1]]]))
    assert tuple(tr.score(x[:B]).shape) == (B,) and tuple(tr.net.eval()(x[:B]).shape) == (B, 1)


@pytest.mark.parametrize("c,l_t,l_ll", [(0.0, math.log(2), math.log(2)), (1.0, 0.813262, 1.313262)])
def test_closed_form_constant_affinity(c, l_t, l_ll):
    tr = logo.AffinityTrainer(16, hidden=32)
    with torch.no_grad():
        tr.net[-1].weight.zero_()
        tr.net[-1].bias.fill_(c)
    a, b = F.normalize(torch.randn(B, 16), dim=1), F.normalize(torch.randn(B, 16), dim=1)
    l_ll_now = logo.repulsion_loss(tr.score(torch.cat([a, b], 1)))
    logs = tr.step(a, b)  # reports the loss of its forward, before its update
    assert abs(logs["aff_loss"].item() - l_t) < 1e-6 and abs(l_ll_now.item() - l_ll) < 1e-6
    assert logs["t_pos"].item() == pytest.approx(c) and logs["t_neg"].item() == pytest.approx(c)


@pytest.mark.parametrize("n", [2, 3, 5, 64])
def test_derangement(n):
    for _ in range(100):
        p = logo.derangement(n)
        assert sorted(p.tolist()) == list(range(n)) and not (p == torch.arange(n)).any()
    with pytest.raises(common.UserError):
        logo.derangement(1)


def test_aff_noise_perturbs_positive_rows_only():
    seen = []
    a, b = F.normalize(torch.randn(B, 16), dim=1), F.normalize(torch.randn(B, 16), dim=1)
    for noise in (0.0, 0.3):
        tr = logo.AffinityTrainer(16, hidden=32, noise=noise)
        forward = tr.trained
        tr.trained = lambda x: seen.append(x) or forward(x)
        torch.manual_seed(0)
        tr.step(a, b)
    clean, noisy = seen
    n = 2 * B
    assert torch.equal(clean[n:], noisy[n:]) and not torch.allclose(clean[:n], noisy[:n])
    assert (noisy[:n] - clean[:n]).std().item() == pytest.approx(0.3 / 4, rel=0.3)  # std 0.3 / sqrt(D), D = 16


# ---------------------------------------------------------------- 5-6. main loss

def test_simsiam_main_loss_closed_form():
    e = torch.eye(3)
    z_g1, z_g2, p_l = e[[0] * B], e[[1] * B], e[[2] * B]
    loss, gg, lg = logo.main_loss(common.neg_cosine, [z_g2, z_g1, p_l, p_l], [z_g1, z_g2])
    assert loss.item() == pytest.approx(-1 / 3, abs=1e-7) and len(gg) == 2 and len(lg) == 4
    same = unit(torch.randn(B, 5))
    assert logo.main_loss(common.neg_cosine, [same] * 4, [same] * 2)[0].item() == pytest.approx(-1.0, abs=1e-6)


def test_moco_pair_loss_closed_form():
    e = torch.eye(6)
    q, queue = e[[0] * B], e[1:5]
    pair = lambda a, b: common.info_nce(a, b, queue, 0.2)
    expect = math.log(1 + 4 * math.exp(-5))
    assert pair(q, q).item() == pytest.approx(expect, abs=1e-6) and expect == pytest.approx(0.026595, abs=1e-6)
    assert logo.main_loss(pair, [q] * 4, [q] * 2)[0].item() == pytest.approx(expect, abs=1e-6)


# ---------------------------------------------------------------- 7-8. stop-gradients and isolation

def test_simsiam_local_global_gradients_reach_locals_only():
    _, setup = make("simsiam")
    views = [v.requires_grad_() for v in rand_views()]
    z = [setup.model.embed(v) for v in views]
    _, _, lg = logo.main_loss(common.neg_cosine, [setup.model.base.predictor(x) for x in z], z[:2])
    sum(lg).backward()
    assert all(v.grad is None or not v.grad.any() for v in views[:2])
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in views[2:])


@pytest.mark.parametrize("framework", ["simsiam", "mocov2"])
def test_affinity_isolated_from_encoder(framework):
    args, setup = make(framework)
    model, tr = setup.model, setup.state
    opt = common.make_optimizer(model, args)
    tr_ids = {id(p) for p in tr.net.parameters()}
    assert not tr_ids & {id(p) for g in opt.param_groups for p in g["params"]}
    assert (not tr_ids & {id(p) for p in model.parameters()}
            and not any(k.startswith("affinity") for k in model.state_dict()))
    t_before = copy.deepcopy(tr.net.state_dict())
    loss, logs = model(rand_views(), None)  # includes the affinity step
    assert all(p.grad is None for p in model.parameters())
    t_after_aff = copy.deepcopy(tr.net.state_dict())
    assert not torch.equal(t_before["0.weight"], t_after_aff["0.weight"])  # T did learn
    aff_grads = [p.grad.clone() for p in tr.net.parameters()]
    loss.backward()
    opt.step()
    model.after_step()
    assert all(torch.equal(v, tr.net.state_dict()[k]) for k, v in t_after_aff.items())  # weights and BN buffers
    assert all(torch.equal(g, p.grad) for g, p in zip(aff_grads, tr.net.parameters()))
    assert all(p.requires_grad for p in tr.net.parameters()) and tr.net.training
    assert {"l_gg", "l_lg", "l_ll", "aff_loss", "aff_acc", "t_pos", "t_neg", "local_cos"} <= set(logs)
    assert all(not v.requires_grad and v.dim() == 0 for v in logs.values())
    if framework == "mocov2":
        assert all(p.grad is None for p in model.base.encoder_k.parameters())


# ---------------------------------------------------------------- 9. signs

def test_signs_of_the_min_max_game():
    torch.manual_seed(0)
    tr = logo.AffinityTrainer(16, hidden=32, lr=0.1)
    row = unit(torch.randn(1, 32))
    tr.net.eval()
    grads = []
    for sign in (1, -1):
        tr.net.zero_grad()
        F.softplus(sign * tr.net(row)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tr.net.parameters()]))
    assert F.cosine_similarity(*grads, dim=0).item() == pytest.approx(-1.0, abs=1e-5)

    a = unit(torch.randn(32, 16))  # separable: a same-image pair is the same vector twice
    torch.manual_seed(1)
    x, y = logo.affinity_batch(a, a, logo.derangement(32))
    margin = lambda: (lambda t: t[y > 0].mean() - t[y == 0].mean())(copy.deepcopy(tr.net).train()(x).squeeze(1))
    before = margin()
    torch.manual_seed(1)
    tr.step(a, a)
    assert margin() > before

    encoder = torch.nn.Linear(10, 16)
    x1, x2 = torch.randn(B, 10), torch.randn(B, 10)
    t_of = lambda: tr.score(torch.cat([F.normalize(encoder(x1), dim=1), F.normalize(encoder(x2), dim=1)], 1))
    t0 = t_of()
    logo.repulsion_loss(t0).backward()
    with torch.no_grad():
        for p in encoder.parameters():
            p -= 0.5 * p.grad
    assert t_of().mean() < t0.mean()


def test_repulsion_leaves_affinity_untouched():
    tr = logo.AffinityTrainer(16, hidden=32)
    stats = copy.deepcopy(tr.net.state_dict())
    pairs = unit(torch.randn(B, 32)).requires_grad_()
    logo.repulsion_loss(tr.score(pairs)).backward()
    assert pairs.grad.abs().sum() > 0 and all(p.grad is None for p in tr.net.parameters())
    assert all(torch.equal(v, tr.net.state_dict()[k]) for k, v in stats.items())  # eval BN: no running-stat update


# ---------------------------------------------------------------- 10. reductions

@pytest.mark.parametrize("framework", ["simsiam", "mocov2"])
@pytest.mark.parametrize("arm", ["logo", "baseline"])
def test_l_gg_is_common_base_loss_bit_for_bit(framework, arm):
    _, setup = make(framework, *(["--baseline"] if arm == "baseline" else []))
    model = setup.model
    reference = copy.deepcopy(model.base)  # common.SimSiam / common.MoCoV2(symmetric=True) with the same weights
    views = rand_views(2 if arm == "baseline" else 4)
    torch.manual_seed(3)
    loss, logs = model(views, None)
    torch.manual_seed(3)
    expect, _ = reference(views[:2], None)
    assert torch.equal(logs["l_gg"], expect.detach())
    if arm == "baseline":
        assert torch.equal(loss, expect) and setup.state is None


@pytest.mark.parametrize("framework", ["simsiam", "mocov2"])
def test_lambda_zero_is_main_loss_without_affinity(framework):
    _, setup = make(framework, "--ll-weight", "0")
    model = setup.model
    assert model.affinity is None and setup.state is None
    views = rand_views()
    torch.manual_seed(3)
    loss, logs = model(views, None)
    torch.manual_seed(3)
    z = [model.embed(v) for v in views]
    if framework == "simsiam":
        expect = logo.main_loss(common.neg_cosine, [model.base.predictor(x) for x in z], z[:2])[0]
    else:
        k2, k1 = (common.shuffled_forward(model.base.encoder_k, v) for v in (views[1], views[0]))
        pair = lambda q, k: common.info_nce(q, k, model.base.queue.queue, 0.2)
        expect = logo.main_loss(pair, z, [k1, k2])[0]
    assert torch.equal(loss, expect) and "l_ll" not in logs
    _, cos_setup = make(framework, "--affinity", "cos")
    _, logs = cos_setup.model(views, None)
    assert cos_setup.model.affinity is None and torch.equal(logs["l_ll"], logs["local_cos"])


# ---------------------------------------------------------------- 11. queue and EMA

def test_queue_and_ema_once_per_step():
    args, setup = make("mocov2", "--moco-k", str(3 * B))
    model, m = setup.model, 0.999
    opt = common.make_optimizer(model, args)
    for step in range(2):
        k_before = [p.clone() for p in model.base.encoder_k.parameters()]
        loss, _ = model(rand_views(), None)
        assert all(torch.equal(a, b) for a, b in zip(k_before, model.base.encoder_k.parameters()))  # not in forward
        k1, k2 = model._keys
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step()
        q = list(model.base.encoder_q.parameters())
        assert all(torch.allclose(k, m * kb + (1 - m) * qp, atol=1e-7, rtol=1e-6)
                   for k, kb, qp in zip(model.base.encoder_k.parameters(), k_before, q))
        assert model.base.queue.ptr.item() == (2 * B * (step + 1)) % (3 * B)  # 2 x B_global keys, wrapping mod K
        start = 2 * B * step
        rows = [(start + i) % (3 * B) for i in range(2 * B)]
        assert torch.equal(model.base.queue.queue[rows], torch.cat([k1, k2]))
        model.after_step()  # a second call without a new forward changes nothing
        assert model.base.queue.ptr.item() == (2 * B * (step + 1)) % (3 * B)


# ---------------------------------------------------------------- 12. resume

def test_resume_is_exact(tmp_path):
    common_flags = [*TINY, "--subset", 32, "--batch-size", 8, "--framework", "mocov2", "--moco-k", 64, "--epochs", 1,
                    "--bn-splits", 2]
    a, b = tmp_path / "a", tmp_path / "b"
    run_main([*common_flags, "--out", a, "--max-steps", 2])
    run_main([*common_flags, "--out", a, "--max-steps", 3])  # 2 steps, save, resume into fresh objects, 1 step
    run_main([*common_flags, "--out", b, "--max-steps", 3])  # 3 straight steps
    ca, cb = (torch.load(d / "checkpoint.pth", weights_only=False) for d in (a, b))
    assert ca["step"] == cb["step"] == 3
    assert ca["partial"]["loss"] == cb["partial"]["loss"]   # same configuration, same machine: bit-exact
    for k in ca["model"]:  # backbone, projector, key encoder, queue, queue_ptr
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for k, v in ca["state"]["net"].items():  # T's weights and BN buffers
        assert torch.equal(v, cb["state"]["net"][k]), k
    for sa, sb in ((ca["optimizer"], cb["optimizer"]), (ca["state"]["opt"], cb["state"]["opt"])):
        assert all(torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"])
                   for i in sa["state"])
    assert torch.equal(ca["rng"][0]["torch"], cb["rng"][0]["torch"])


# ---------------------------------------------------------------- 13. smoke through the CLI, figures

@pytest.mark.parametrize("framework,arm,cli", [("simsiam", "logo", True), ("simsiam", "baseline", True),
                                               ("simsiam", "multicrop", False), ("mocov2", "logo", False),
                                               ("mocov2", "baseline", False), ("mocov2", "multicrop", False)])
def test_smoke_arms_and_figures(out, framework, arm, cli):
    flags = [*TINY, "--subset", 16, "--batch-size", 8, "--epochs", 1, "--max-steps", 2, "--framework", framework,
             "--moco-k", 64, "--bn-splits", 2, "--out", out,
             *{"logo": [], "baseline": ["--baseline"], "multicrop": ["--ll-weight", 0]}[arm]]
    if cli:
        r = run_cli("logo.py", *flags)
        assert r.rc == 0, r.err
        js = r.json
    else:
        js = run_main(flags)
    assert {"method", "dataset", "epochs", "steps", "train_time_s", "images_per_s", "knn_top1", "out"} <= set(js)
    assert js["method"] == ("logo-baseline" if arm == "baseline" else "logo") and js["framework"] == framework
    assert js["steps"] == 2 and js["out"] == out
    rec = json.loads(open(os.path.join(out, "log.jsonl")).read().splitlines()[-1])
    assert math.isfinite(rec["loss"]) and ("l_ll" in rec) == (arm == "logo") and ("l_lg" in rec) == (arm != "baseline")
    if arm == "logo":
        assert 0 <= rec["aff_acc"] <= 1 and math.isfinite(rec["t_pos"] - rec["t_neg"])
    shown = run_main([*flags, "--show-views"])
    ncol = 3 if arm == "baseline" else 5
    for name, shape in [("curves.png", None), ("views.png", (840, 100 * 2 * ncol)),
                        ("affinity_hist.png", (400, 400) if arm == "logo" else None)]:
        path = os.path.join(out, name)
        if name == "affinity_hist.png" and arm != "logo":
            assert not os.path.exists(path) and "affinity_hist" not in shown
            continue
        img = mpimg.imread(path)
        assert img.std() > 0 and (shape is None or img.shape[:2] == shape), (name, img.shape)
    if arm == "logo":
        assert 0 <= shown["affinity_acc"] <= 100


def test_show_views_without_training(out):
    shown = run_main([*TINY, "--show-views", "--out", out])
    assert mpimg.imread(shown["views"]).shape[:2] == (840, 1000) and "affinity_hist" not in shown


def test_user_errors(capsys):
    for flags, words in ((["--framework", "mocov2", "--moco-k", "16"], "--moco-k 16"),
                         (["--local-scale", "0.5", "0.1"], "--local-scale 0.5 0.1"),
                         (["--ll-weight", "-1"], "--ll-weight -1")):
        with pytest.raises(SystemExit) as e:
            logo.parse(["--dataset", "synthetic", "--batch-size", "16", *flags])
        assert e.value.code == 2 and words in capsys.readouterr().err


# ---------------------------------------------------------------- 14. distributed

def test_two_processes_match_one_with_split_bn(tmp_path):
    flags = [*TINY, "--subset", 16, "--batch-size", 8, "--framework", "mocov2", "--stem", "cifar", "--lr", 0.1,
             "--moco-k", 64, "--epochs", 1]
    # The encoders only: T's own step differs by design (its BN sees each rank's rows, its negatives are deranged
    # within each rank's batch), and reaches the encoders through lambda = 1e-4 only.
    assert_same_update(*last_step_both_ways("logo.py", flags, 2, tmp_path))


DDP_SCRIPT = """
import json, sys, torch, torch.distributed as dist, torch.nn.functional as F
sys.path.insert(0, {root!r})
import logo
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(rank)  # different init and different data on each rank: DDP must make one T of them
tr = logo.AffinityTrainer(8, hidden=16, lr=0.5)
init = torch.cat([p.detach().flatten().clone() for p in tr.net.parameters()])
for _ in range(2):
    logs = tr.step(F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1))
mine = torch.cat([p.detach().flatten() for p in tr.net.parameters()])
gathered = [torch.empty_like(mine) for _ in range(2)]
dist.all_gather(gathered, mine)
moved = (mine - init).abs().max()
if rank == 0:
    print(json.dumps({{"max_diff": (gathered[0] - gathered[1]).abs().max().item(), "moved": moved.item()}}))
del tr  # the DDP wrapper goes before its process group
dist.destroy_process_group()
"""


def test_affinity_ddp_identical_across_ranks(tmp_path):
    script = tmp_path / "ddp_affinity.py"
    script.write_text(DDP_SCRIPT.format(root=str(logo.__file__.rsplit(os.sep, 1)[0])))
    r = run_cli(str(script), nproc=2)
    assert r.rc == 0, r.err
    assert r.json["max_diff"] == 0.0 and r.json["moved"] > 1e-3
