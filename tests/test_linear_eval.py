"""linear_eval.py: the lr sweep chosen on a held-out split (never on the test set), the paper protocol, and
semi-supervised fine-tuning on a class-balanced or named label subset."""
import hashlib, math, types

import pytest
import torch
import torchvision

import common
import linear_eval
from conftest import EPS32, run_cli

C = 10   # synthetic classes


def backbone(path, seed=0, stem_scale=1.0):
    """A random-init ResNet-18 (ImageNet stem) saved as backbone.pth; stem_scale multiplies conv1's weights. At
    initialisation every BN is x -> gamma x (running mean 0, var 1, beta 0 in eval mode) and ReLU, max-pool and the
    residual sums are positively homogeneous, so the pooled features are exactly stem_scale times larger."""
    torch.manual_seed(seed)
    net = common.build_backbone("resnet18", "imagenet")
    net.conv1.weight.data *= stem_scale
    common.export_backbone(net, str(path), method="random", dataset="synthetic", epoch=0)
    return str(path)


def probe(path, *extra):
    r = run_cli("linear_eval.py", path, "--dataset", "synthetic", "--subset", "200", "--precompute", "--gpus", "0",
                *extra)
    assert r.rc == 0, r.err[-3000:]
    return r, r.json["runs"][path]


# ---------------------------------------------------------------- the default protocol, end to end

@pytest.mark.parametrize("stem_scale", [1.0, 10.0])
def test_default_sweep_reports_the_heldout_choice_and_never_diverges(tmp_path, stem_scale):
    """Random init, and the same backbone with features x10 (a trained backbone's scale, which the old BN running
    statistics had not caught up with after a few steps). The chosen head's last-epoch training loss must be finite
    and below ln C, the loss of a uniform guess, the one principled line between learning and diverging."""
    r, res = probe(backbone(tmp_path / "b.pth", stem_scale=stem_scale), "--epochs", "10")
    assert "linear_best_top1" not in res                                   # no best-of-test-epochs figure
    assert res["linear_lr"] in linear_eval.PROTOCOLS["sweep"]["lrs"]
    assert 0 <= res["linear_heldout_top1"] <= 100 and 0 <= res["linear_top1"] <= res["linear_top5"] <= 100
    assert math.isfinite(res["linear_loss"]) and res["linear_loss"] < math.log(C)
    # 200 images, 10 classes: 2 per class held out (floor(0.1 x 200 / 10)), so held-out top-1 is a multiple of 5 %
    assert "180 training images, 20 held out" in r.out
    assert res["linear_heldout_top1"] % 5 == pytest.approx(0, abs=1e-4)


def test_paper_protocol_cli_trains_one_head_at_lr_10_on_all_images(tmp_path):
    r, res = probe(backbone(tmp_path / "b.pth"), "--protocol", "paper", "--epochs", "2")
    assert res["linear_lr"] == 10.0 and res["linear_heldout_top1"] is None and "linear_best_top1" not in res
    assert "batch 200, 2 epochs (step), 200 training images" in r.out    # 512 (ContrastiveCrop), capped at the set
    assert math.isfinite(res["linear_loss"])


# ---------------------------------------------------------------- the pieces, at constructed inputs

def test_paper_protocol_settings_and_step_schedule():
    a = types.SimpleNamespace(protocol="paper", lr=None, batch_size=None, epochs=None)
    small, large = linear_eval.probe_settings(a, 32), linear_eval.probe_settings(a, 224)
    assert small == dict(lrs=(10.0,), batch_size=512, epochs=100, schedule="step")     # ContrastiveCrop Table 1
    assert large == dict(lrs=(30.0,), batch_size=256, epochs=100, schedule="step")     # MoCo
    f = lambda epoch: linear_eval.lr_factor("step", epoch * 7 + 3, 7, 100)              # mid-epoch, 7 steps each
    assert [f(e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    sweep = linear_eval.probe_settings(types.SimpleNamespace(protocol="sweep", lr=[0.5], batch_size=64, epochs=3), 32)
    assert sweep == dict(lrs=(0.5,), batch_size=64, epochs=3, schedule="cosine")
    assert linear_eval.lr_factor("cosine", 0, 7, 100) == 1.0                            # per step, down to ~0
    assert linear_eval.lr_factor("cosine", 699, 7, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 699 / 700)))


def test_chosen_head_is_the_heldout_argmax_among_heads_that_learnt():
    acc = torch.tensor([30.0, 50.0, 50.0, 70.0, 90.0], dtype=torch.float64)
    loss = torch.tensor([2.0, 1.0, 1.5, 1.2, 1.1])
    assert linear_eval.choose_head(acc, loss, C) == 4                      # the argmax
    assert linear_eval.choose_head(acc, torch.tensor([2.0, 1.0, 1.5, 1.2, math.nan]), C) == 3
    # 2.4 > ln 10 and inf: out; the tie at 50 goes to the smaller lr
    assert linear_eval.choose_head(acc, torch.tensor([2.0, 1.0, 1.5, 2.4, math.inf]), C) == 1
    assert linear_eval.choose_head(acc, torch.full((5,), 3.0), C) == 4       # none learnt: all compete


def test_heldout_split_is_balanced_disjoint_and_the_same_for_any_number_of_processes(monkeypatch):
    labels = torch.tensor([0] * 30 + [1] * 25 + [2] * 40 + [3] * 2)
    labels = labels[torch.randperm(97, generator=torch.Generator().manual_seed(1))]
    held, (rows,) = linear_eval.heldout_split(labels, 0.1, seed=3)
    # k = floor(0.1 x 97 / 4) = 2 per class; class 3 has 2 images and keeps one for training
    assert torch.bincount(labels[held], minlength=4).tolist() == [2, 2, 2, 1]
    assert not held[rows].any() and len(rows) + int(held.sum()) == len(labels)             # disjoint, complete
    again, _ = linear_eval.heldout_split(labels, 0.1, seed=3)
    other, _ = linear_eval.heldout_split(labels, 0.1, seed=4)
    assert torch.equal(held, again) and not torch.equal(held, other)
    none, (everything,) = linear_eval.heldout_split(labels, 0.0, seed=3)                   # --protocol paper
    assert not none.any() and len(everything) == len(labels)
    monkeypatch.setattr(common, "get_world", lambda: 2)                                    # as each of 2 ranks sees it
    held2, shards = linear_eval.heldout_split(labels, 0.1, seed=3)
    assert torch.equal(held2, held)
    starts = [common.shard_rows(len(labels), r).start for r in range(2)]
    assert torch.equal(torch.cat([s + r for s, r in zip(starts, shards)]), rows)          # same training rows


def make_batches(f, y, batch):
    """epoch -> shuffled batches (features, labels), the same for every call."""
    def batches(epoch):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        return ((f[b], y[b]) for b in order.split(batch))
    return batches


def test_heads_side_by_side_equal_heads_trained_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    N, D, K, lrs, epochs = 96, 32, 4, (0.01, 0.1, 1.0), 4
    f, y = 3 * torch.randn(N, D, generator=g) + 1, torch.randint(0, K, (N,), generator=g)
    mean, std = f.mean(0), f.std(0)
    batches = make_batches(f, y, 32)
    together = linear_eval.LinearHeads(mean, std, K, len(lrs))
    groups = [{"params": lin.parameters(), "lr": lr} for lin, lr in zip(together.linears, lrs)]
    loss = linear_eval.train_sgd(together, groups, batches, epochs, 3, "cosine")
    for h, lr in enumerate(lrs):
        alone = linear_eval.LinearHeads(mean, std, K, 1)
        loss1 = linear_eval.train_sgd(alone, [{"params": alone.parameters(), "lr": lr}], batches, epochs, 3, "cosine")
        for a, b in zip(alone.linears[0].parameters(), together.linears[h].parameters()):
            # The same operations on the same numbers; a different reduction order inside the cross-entropy (over
            # K = 4 logits) could move each gradient by a few ulps, which 12 steps of momentum (x10) carry into the
            # weights: 12 x 10 x K eps32 of their magnitude bounds it, and a real coupling of heads is O(1).
            assert (a - b).abs().max() <= 12 * 10 * K * EPS32 * a.abs().max(), (lr, (a - b).abs().max())
        assert loss1[0] == pytest.approx(loss[h].item(), rel=12 * 10 * K * EPS32)
    assert not torch.allclose(together.linears[0].weight, together.linears[2].weight)   # the lrs did differ


def test_collapsed_features_the_large_lrs_diverge_and_the_choice_does_not():
    """Rank-one features (every dimension the same signal: the worst case, curvature up to (D + 1) / 2 after
    standardising) at D = 512, classes overlapping along that signal: lr 1 must end above ln K (a real stress), lr
    0.001, under the stability bound 2 (1 + 0.9) / ((D + 1) / 2) = 0.0148, must learn, and the chosen head is the
    held-out argmax among the heads that learnt."""
    g = torch.Generator().manual_seed(0)
    D, K, N = 512, 4, 1024
    a = torch.randn(N, generator=g)
    f = a[:, None] * torch.randn(D, generator=g) + 1e-3 * torch.randn(N, D, generator=g)
    y = torch.bucketize(a + 0.3 * torch.randn(N, generator=g), a.quantile(torch.tensor([0.25, 0.5, 0.75])))
    tr, ho = slice(0, 896), slice(896, N)
    mean, std = f[tr].mean(0), f[tr].std(0)
    lrs = linear_eval.PROTOCOLS["sweep"]["lrs"]
    heads = linear_eval.LinearHeads(mean, std, K, len(lrs))
    groups = [{"params": lin.parameters(), "lr": lr} for lin, lr in zip(heads.linears, lrs)]
    loss = linear_eval.train_sgd(heads, groups, make_batches(f[tr], y[tr], 128), 10, 7, "cosine")
    assert loss[-1] > math.log(K) and loss[0] < math.log(K), loss
    acc = linear_eval.heads_top1(heads, f[ho], y[ho])
    h = linear_eval.choose_head(acc, loss, K)
    assert torch.isfinite(loss[h]) and loss[h] < math.log(K)
    assert acc[h] == acc[loss < math.log(K)].max()


# ---------------------------------------------------------------- fine-tuning on a subset of the labels

def test_label_subset_is_class_balanced_and_seeded():
    labels = torch.tensor([0] * 300 + [1] * 120 + [2] * 580)               # imbalanced: 1000 images, 3 classes
    one = linear_eval.balanced_subset(labels, 0.01, seed=0)
    assert torch.bincount(labels[one]).tolist() == [3, 3, 3]               # floor(0.01 x 1000 / 3) each
    ten = linear_eval.balanced_subset(labels, 0.10, seed=0)
    assert torch.bincount(labels[ten]).tolist() == [33, 33, 33]
    assert torch.equal(one, linear_eval.balanced_subset(labels, 0.01, seed=0))
    assert not torch.equal(ten, linear_eval.balanced_subset(labels, 0.10, seed=1))
    tiny = linear_eval.labelled_subset(common.Source(torch.arange(200) % C), "1%", seed=0)  # 2 a class x 1 % < 1
    assert torch.bincount(torch.arange(200)[tiny] % C).tolist() == [1] * C


def image_folder(root):
    """train/ and val/ of 2 classes x 3 PNGs named img<i>.png."""
    for split in ("train", "val"):
        for i in range(6):
            d = root / split / f"class{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            torchvision.transforms.functional.to_pil_image(torch.full((3, 8, 8), 40 * i, dtype=torch.uint8)).save(
                d / f"{split}{i}.png")
    return root


def test_named_subset_matches_base_names(tmp_path):
    data = common.load_data(types.SimpleNamespace(dataset="folder", data=str(image_folder(tmp_path / "d")),
                                                  download=False, class_list=None, subset=0))
    (tmp_path / "list.txt").write_text("train3.png\n\ntrain0.png\n")
    idx = linear_eval.labelled_subset(data.knn_train, str(tmp_path / "list.txt"), seed=0)
    assert sorted(data.knn_train.files[i].rsplit("/", 1)[1] for i in idx) == ["train0.png", "train3.png"]


def _one_line_error(r, *words):
    lines = [l for l in r.err.strip().splitlines() if l.strip()]
    assert r.rc == 2 and len(lines) == 1 and "Traceback" not in r.err, r.err[-3000:]
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_labels_end_in_one_line(tmp_path):
    root = image_folder(tmp_path / "d")
    (tmp_path / "list.txt").write_text("train1.png\nn01440764_10026.JPEG\n")
    folder = ["--dataset", "folder", "--data", str(root), "--gpus", "0", "--finetune"]
    _one_line_error(run_cli("linear_eval.py", "nope.pth", *folder, "--labels", str(tmp_path / "list.txt")),
                    "n01440764_10026.JPEG", "not found")
    _one_line_error(run_cli("linear_eval.py", "nope.pth", *folder, "--labels", str(tmp_path)), "cannot read --labels")
    for bad in ("0%", "150%", "x%"):
        _one_line_error(run_cli("linear_eval.py", "nope.pth", *folder, "--labels", bad), f"--labels {bad}")
    _one_line_error(run_cli("linear_eval.py", "nope.pth", "--dataset", "synthetic", "--finetune"), "--labels")


def test_finetune_cli_reports_top1_and_leaves_the_checkpoint_untouched(tmp_path):
    path = backbone(tmp_path / "b.pth")
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()
    r = run_cli("linear_eval.py", path, "--dataset", "synthetic", "--subset", "200", "--gpus", "0", "--finetune",
                "--labels", "1%", "--finetune-epochs", "1")
    assert r.rc == 0, r.err[-3000:]
    res = r.json["runs"][path]
    assert res["finetune_images"] == C                                    # 1 % of 200 over 10 classes: 1 each
    assert 0 <= res["finetune_top1"] <= res["finetune_top5"] <= 100 and "linear_top1" not in res
    assert "| run | finetune_top1" in r.out and "batch 10, lr 0.001953, 1 epochs" in r.out   # 0.05 x 10 / 256
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before


# ---------------------------------------------------------------- --robustness (CO-SSL's claims)

def _robust_setup():
    torch.manual_seed(0)
    net = common.build_backbone("resnet18", "cifar").eval().requires_grad_(False)
    head = torch.nn.Linear(net.out_dim, C)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    pix = torch.rand(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    gen = lambda i: torch.Generator().manual_seed(100 + i)
    return net, head, (pix - mean) / std, y, gen, mean, std


def test_robustness_zero_strength_is_the_clean_probe_and_full_masking_leaves_the_bias():
    net, head, x, y, gen, mean, std = _robust_setup()
    clean = head(net(x))
    for kind in ("noise", "internal", "fgsm", "pgd"):
        torch.testing.assert_close(linear_eval.corrupted_logits(kind, 0.0, net, head, x, y, gen, mean, std), clean,
                                   rtol=1e-4, atol=1e-4)  # only the [0, 1] round trip's rounding
    full = linear_eval.corrupted_logits("internal", 1.0, net, head, x, y, gen, mean, std)
    torch.testing.assert_close(full, head.bias.expand(4, C))  # every position zeroed: pooled features 0


def test_noise_and_masks_belong_to_the_image_not_the_batch():
    """Image i's corruption comes from gen(i): the same logits whether it is first in a batch or second."""
    net, head, x, y, gen, mean, std = _robust_setup()
    for kind in ("noise", "internal"):
        a = linear_eval.corrupted_logits(kind, 0.5, net, head, x[0:2], y[0:2], gen, mean, std)
        b = linear_eval.corrupted_logits(kind, 0.5, net, head, x[1:3], y[1:3], lambda i: gen(i + 1), mean, std)
        torch.testing.assert_close(a[1], b[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a[1], head(net(x[1:2]))[0], atol=1e-3)  # and it does corrupt


def test_attacks_stay_in_their_radius_and_raise_the_loss(monkeypatch):
    net, head, x, y, gen, mean, std = _robust_setup()
    seen = []
    monkeypatch.setattr(net, "forward", lambda z, f=net.forward: (seen.append(z.detach() * std + mean), f(z))[1])
    eps = 4 / 255
    clean = torch.nn.functional.cross_entropy(head(net(x)), y)
    pix = seen[-1]
    for kind in ("fgsm", "pgd"):
        logits = linear_eval.corrupted_logits(kind, eps, net, head, x, y, gen, mean, std)
        adv = seen[-1]
        assert (adv - pix).abs().max() <= eps + 1e-5 and adv.min() >= -1e-6 and adv.max() <= 1 + 1e-6
        assert torch.nn.functional.cross_entropy(logits, y) > clean
        if kind == "fgsm":  # one signed step: every pixel moved by the full radius unless [0, 1] cut it
            moved = (adv - pix).abs()
            inside = (pix > eps) & (pix < 1 - eps)
            torch.testing.assert_close(moved[inside], torch.full_like(moved[inside], eps), rtol=0, atol=1e-5)


def test_robustness_cli_table_plot_and_json(tmp_path):
    path = backbone(tmp_path / "b.pth")
    r, res = probe(path, "--epochs", "2", "--robustness", "--robust-images", "20", "--out", str(tmp_path))
    rob = res["robustness"]
    assert list(rob) == list(linear_eval.ROBUSTNESS) and rob["fgsm"].keys() == {"1/255", "2/255", "4/255"}
    assert all(0 <= v <= 100 and (v * 20 / 100) == pytest.approx(round(v * 20 / 100), abs=1e-3)  # of 20 images
               for kind in rob.values() for v in kind.values())
    assert "| run | clean | noise 0.05 |" in r.out and (tmp_path / "robustness.png").stat().st_size > 0
    bad = run_cli("linear_eval.py", path, "--dataset", "synthetic", "--knn-only", "--robustness", "--gpus", "0")
    assert bad.rc == 2 and "--robustness measures the linear probe" in bad.err and "Traceback" not in bad.err
