"""The base frameworks follow their papers (issue: base frameworks that learn), and evaluation with several processes
sees the BatchNorm statistics a one-process split-BN run keeps."""
import argparse, math, os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import common
from conftest import TINY, free_port, run_cli


def base_args(*argv):
    return common.parse_base(["--dataset", "synthetic", *argv])


def build(framework, *argv, imagenet=False):
    args = base_args("--framework", framework, *argv)
    return common.build_framework(framework, common.build_backbone("resnet18", "imagenet"), imagenet, args)


# ---------------------------------------------------------------- SimCLR as its paper

def test_simclr_paper_loss_head_and_colour_strength():
    """Loss x 1 (ContrastiveCrop's x t/0.07 made every step 7.1x larger at t 0.5), BN in the projection head, colour
    strength 0.5 on 32 px images (SimCLR appendix B.9) and 1.0 at ImageNet sizes."""
    simclr = build("simclr")
    assert simclr.loss_scale == 1.0 and simclr.temperature == 0.5
    assert any(isinstance(m, nn.BatchNorm1d) for m in simclr.encoder.head)
    assert common.framework_recipes("simclr", 32)[0].jitter == pytest.approx((0.4, 0.4, 0.4, 0.1))
    assert common.framework_recipes("simclr", 224)[0].jitter == pytest.approx((0.8, 0.8, 0.8, 0.2))


def test_simclr_encodes_both_views_in_one_pass():
    """One backbone call on 2B images per step, so BatchNorm normalises both views together."""
    torch.manual_seed(0)
    simclr = build("simclr")
    calls = []
    simclr.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    v = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    simclr(v)[0].backward()
    assert calls == [8]


def test_split_bn_chunks_hold_both_views_of_their_images():
    """With split-BN over s chunks, chunk k normalises both views of images kB/s..(k+1)B/s-1: what one of s GPUs
    holds. Reference: plain BN applied to each chunk's [view1; view2] separately."""
    torch.manual_seed(0)
    B, s = 8, 2
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    xs = [torch.randn(B, 5) for _ in range(2)]
    ref = [net(torch.cat([x[k * B // s:(k + 1) * B // s] for x in xs])) for k in range(s)]   # each: view1, view2
    want = [torch.cat([r[:B // s] for r in ref]), torch.cat([r[B // s:] for r in ref])]
    got = common.encode_together(common.convert_split_bn(net, s), xs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)   # unit-scale outputs: a few fp32 roundings


# ---------------------------------------------------------------- BYOL's cosine target momentum

def test_byol_target_momentum_rises_on_a_cosine_to_one():
    """BYOL Sec. 3.2: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, from --ema (0.996; small data 0.99) to 1."""
    byol = build("byol", imagenet=True)
    for progress, want in [(0.0, 0.996), (0.5, 0.998), (1.0, 1.0), (0.25, 1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)]:
        byol.progress = progress
        assert byol.momentum() == pytest.approx(want, abs=1e-12)
    small = build("byol")
    small.progress = 0.5
    assert (small.base_momentum, small.momentum()) == pytest.approx((0.99, 0.995), abs=1e-12)


def test_small_data_constants_and_the_papers():
    """~1k steps on 10k images: MoCo's CIFAR demo constants; ImageNet-sized data: the MoCo-v2 paper's."""
    moco = build("mocov2")
    assert (moco.temperature, len(moco.queue.queue), moco.momentum) == (0.1, 4096, 0.99)
    assert any(isinstance(m, nn.BatchNorm1d) for m in moco.encoder_q.head)      # our choice on small data
    moco = build("mocov2", "--queue-size", "512", imagenet=True)
    assert (moco.temperature, len(moco.queue.queue), moco.momentum) == (0.2, 512, 0.999)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in moco.encoder_q.head)  # MoCo-v2's head


def test_residual_branches_start_at_zero_where_each_official_code_does():
    """SimSiam's code zero-initialises the last BN scale of every residual block; BYOL's (haiku's ResNet v1) only that
    of bottleneck blocks, so ResNet-50 starts there and ResNet-18 keeps the standard init (scale 1)."""
    def last_bn_scales(framework, arch):
        args = base_args("--framework", framework, "--arch", arch, "--subset", "16", "--gpus", "0")
        args.device = torch.device("cpu")
        data = common.load_data(args)
        common.resolve_data(args, data)
        net = common.build_base(args, data).model.backbone
        blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
        return torch.cat([(b.bn3 if hasattr(b, "bn3") else b.bn2).weight.detach() for b in blocks])

    assert torch.count_nonzero(last_bn_scales("byol", "resnet50")) == 0
    assert bool((last_bn_scales("byol", "resnet18") == 1).all())
    assert torch.count_nonzero(last_bn_scales("simsiam", "resnet18")) == 0


# ---------------------------------------------------------------- --bn-splits made explicit

@pytest.mark.parametrize("batch,splits,suggest", [(12, 8, "--bn-splits 6"), (8, 8, "--bn-splits 4")])
def test_bn_splits_that_do_not_divide_the_batch_are_an_error(batch, splits, suggest):
    """12 images do not split into 8 equal chunks (the old code silently used plain BN); 8 into 8 leaves 1 image per
    chunk (the old code crashed inside BatchNorm)."""
    r = run_cli("common.py", *TINY, "--framework", "mocov2", "--queue-size", "48" if batch == 12 else "16",
                "--batch-size", batch, "--bn-splits", splits, "--epochs", "1", "--out", "/tmp/never-written")
    lines = [l for l in r.err.strip().splitlines() if l.strip()]
    assert r.rc == 2 and len(lines) == 1 and "Traceback" not in r.err, r.err
    assert f"--batch-size {batch}" in lines[0] and f"--bn-splits {splits}" in lines[0] and suggest in lines[0]


def test_split_bn_refuses_a_batch_it_cannot_split():
    bn = common.convert_split_bn(nn.Sequential(nn.BatchNorm1d(3)), 4)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        bn(torch.randn(6, 3))


# ---------------------------------------------------------------- evaluation with several processes

def _rank_stats(net, rank):
    g = torch.Generator().manual_seed(100 + rank)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _monitor(rank, world, port, out, mean_stats):
    """kNN monitor of one process of `world`; mean_stats: the one-process reference with the ranks' mean statistics."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = common.build_backbone("resnet18", "imagenet")
    _rank_stats(net, rank)
    if mean_stats:
        one, two = (common.build_backbone("resnet18", "imagenet") for _ in range(2))
        _rank_stats(one, 0), _rank_stats(two, 1)
        for b, b1, b2 in zip(net.buffers(), one.buffers(), two.buffers()):
            if b.is_floating_point():
                b.copy_((b1 + b2) / 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images, labels = common.synthetic_images(96)
    vi, vl = common.synthetic_images(48, offset=10 ** 6)
    train, val = common.Source(labels, images=images), common.Source(vl, images=vi)
    data = common.Data(train, train, val, *common.DATASETS["synthetic"]["stats"])
    args = argparse.Namespace(device=torch.device("cpu"), workers=0)
    extract, seen = common.extract_features, []
    common.extract_features = lambda *a, **k: seen.append(extract(*a, **k)) or seen[-1]   # what the monitor embeds
    try:
        knn = common.knn_eval(net, data, args, 32)
    finally:
        common.extract_features = extract          # the reference runs inside the test process
    restored = all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    if rank == 0:
        torch.save({"knn": knn, "feats": seen[-1].float(), "restored": restored}, out)   # the queries: all of val
    if world > 1:
        dist.destroy_process_group()


def test_knn_monitor_of_two_processes_equals_the_split_bn_one(tmp_path):
    """Models without SyncBN keep BN statistics per process; the monitor averages them over ranks first, which is what
    split-BN keeps on one process. Before, rank 0 embedded with its own statistics only."""
    ref, two = tmp_path / "ref.pt", tmp_path / "two.pt"
    _monitor(0, 1, 0, ref, mean_stats=True)
    mp.spawn(_monitor, args=(2, free_port(), two, False), nprocs=2)
    ref, two = torch.load(ref), torch.load(two)
    assert two["restored"] and ref["restored"]    # the ranks' own statistics are back after the block
    scale = ref["feats"].abs().max().item()
    torch.testing.assert_close(two["feats"], ref["feats"], rtol=0, atol=2e-3 * scale)   # stored as fp16: 2^-11
    assert two["knn"] == pytest.approx(ref["knn"])
