"""linear_eval.py: frozen-backbone linear probe and kNN for any checkpoint of this repository.

Protocol (the papers'): the backbone is frozen and in eval mode; a linear classifier on its pooled features
(standardised by a non-affine BatchNorm, our choice: lr 10/30 then works whatever the feature scale)
is trained with SGD (momentum 0.9, no weight decay) for 100 epochs, lr x0.1 at 60% and 80% of them;
lr 10 with batch 512 on small datasets (ContrastiveCrop Table 1), lr 30 with batch 256 on ImageNet (MoCo).
Training images get RandomResizedCrop + flip; --precompute instead caches the features of un-augmented
images once (much faster, on CPU too; slightly lower accuracy), fp16, each rank its own shard (ImageNet,
ResNet-50, 8 GPUs: 656 MB per GPU). kNN: k=20, T=0.07, cosine, weighted votes, the memory bank sharded over ranks.
On CUDA the frozen backbone runs in bf16 autocast and channels_last, as in training; the head is trained with DDP.

    python linear_eval.py runs/leoclr-cifar10 --dataset cifar10 --data DIR
    python linear_eval.py runs/logo-cifar10 runs/leoclr-cifar10 --dataset cifar10 --data DIR --precompute   # table + comparison.png
    python linear_eval.py runs/clim-imagenet --dataset imagenet --data DIR --gpus 8
    python linear_eval.py runs/x --dataset synthetic --knn-only

Last stdout line: one JSON object {"runs": {run: {"linear_top1", "linear_top5", "linear_best_top1", "knn_top1", "knn_top5"}}}.
"""
import copy, os

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

PROTOCOL = {"small": dict(lr=10.0, batch_size=512), "imagenet": dict(lr=30.0, batch_size=256)}


def parse(argv=None):
    p = common.Parser(description=__doc__, formatter_class=common.argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("runs", nargs="+", help="run folders or backbone.pth files")
    a("--dataset", default="cifar10", help=f"one of {', '.join(common.DATASETS)}")
    a("--data", default="./data", help="dataset root")
    a("--download", action="store_true", help="let torchvision fetch cifar10/cifar100/stl10")
    a("--class-list", default=None, help="ImageNet wnids, one a line (imagenet100 from a full ImageNet root)")
    a("--subset", type=int, default=0, help="use the first N training images only")
    a("--arch", default=None, help="expected architecture; default: the one stored in backbone.pth")
    a("--epochs", type=int, default=100, help="linear-classifier epochs (100; lr x0.1 at 60%% and 80%%)")
    a("--lr", type=float, default=None, help="classifier lr (10 for small datasets, 30 for ImageNet)")
    a("--batch-size", type=int, default=None, help="global batch (512 small datasets, 256 ImageNet)")
    a("--knn-only", action="store_true", help="only the kNN classifier (seconds)")
    a("--precompute", action="store_true", help="cache features of un-augmented images once; no augmentation")
    a("--size", type=int, default=None, help="input side (default: 32/64/96 native, 224 for ImageNet-like)")
    a("--gpus", type=int, default=1, help="GPUs (0 = CPU); under torchrun the environment decides")
    a("--device", dest="device_type", default="auto", choices=["auto", "cpu"],
      help="auto: CUDA when present; cpu: stay on the CPU (with --gpus N: N CPU processes over gloo)")
    a("--workers", type=int, default=None, help="data-loader workers")
    a("--seed", type=int, default=0, help="seed")
    a("--out", default=None, help="where comparison.png goes (default: the first run's folder)")
    args = p.parse_args(argv)
    if args.dataset not in common.DATASETS:
        common.fail(f"unknown dataset '{args.dataset}'; choose one of {', '.join(common.DATASETS)}")
    return args


def run(args):
    common.seed_everything(args.seed)
    data = common.load_data(args)
    if data.knn_val is None:
        raise common.UserError(f"{args.dataset} at {args.data} has no labelled train/val split to evaluate on")
    if args.workers is None:
        args.workers = common.default_workers(data.knn_train.in_memory, args)
    size = args.size or common.VIEW_SIZE.get(args.dataset) or common.native_size(data.knn_train) or 224
    proto = PROTOCOL["small" if size < 160 else "imagenet"]
    args.lr, args.batch_size = args.lr or proto["lr"], args.batch_size or proto["batch_size"]
    results = {}
    for path in args.runs:
        net, meta = common.load_backbone(path, args.arch)
        net = net.to(args.device).eval().requires_grad_(False)
        if args.device.type == "cuda":  # as training: faster convolutions under bf16
            net = net.to(memory_format=torch.channels_last)
        frozen = copy.deepcopy(net.state_dict())
        common.print0(f"{path}: {meta.get('method')} {meta.get('arch')} ({meta.get('stem')} stem), epoch {meta.get('epoch')}")
        res = evaluate(net, data, args, size)
        for k, v in net.state_dict().items():  # the probe must not touch the backbone (moco-v3 habit)
            assert torch.equal(v, frozen[k]), f"backbone changed during linear evaluation: {k}"
        results[path] = res
        common.print0(f"{path}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items() if v is not None))
    if common.is_main():
        report(results, args)
    common.finish({"dataset": args.dataset, "runs": results})


def evaluate(net, data, args, size):
    """kNN, then the linear probe. Each rank holds its shard of the training features and all test features, both
    fp16: on ImageNet with ResNet-50 and 8 ranks 656 MB + 205 MB per rank instead of 2 x 10.5 GB of fp32 features.
    Frozen forwards run under bf16 autocast on CUDA (fp32 on CPU); the head stays fp32, its cost is negligible."""
    dev, tr, te = args.device, data.knn_train, data.knn_val
    tr_f = common.extract_features(net, tr, size, data.mean, data.std, dev, workers=args.workers, shard=True,
                                   dtype=torch.float16)                                        # N_rank x D
    y_tr = tr.labels[common.shard_rows(len(tr))].to(dev)
    te_f = common.extract_features(net, te, size, data.mean, data.std, dev, workers=args.workers, dtype=torch.float16)
    C = int(max(tr.labels.max(), te.labels.max())) + 1
    knn1, knn5 = common.topk_accuracy(common.knn_classify(tr_f, y_tr, te_f, C), te.labels)
    res = {"knn_top1": knn1, "knn_top5": knn5}
    if args.knn_only:
        return res
    if not args.precompute:  # the probe trains on augmented views: only the test features are needed from here on
        del tr_f, y_tr
    # BN without affine standardises the frozen features (as MAE's probe), so lr 10/30 works whatever their
    # scale; at test time it is a fixed affine map folded into the linear layer: still a linear classifier.
    head = nn.Sequential(nn.BatchNorm1d(net.out_dim, affine=False), nn.Linear(net.out_dim, C)).to(dev)
    head[1].weight.data.normal_(0, 0.01)
    head[1].bias.data.zero_()
    ddp = nn.parallel.DistributedDataParallel(head, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if common.get_world() > 1 else head
    opt = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.6 * args.epochs), int(0.8 * args.epochs)], 0.1)
    best = 0.0
    cuda, rank, world = dev.type == "cuda", common.get_rank(), common.get_world()
    if not args.precompute:
        views = common.RandomResizedCrops(1, (0.08, 1.0))
        plain = common.Recipe(p_jitter=0.0, p_gray=0.0)
        ds = common.ViewDataset(tr, views, [size], [plain], args.seed)
        sampler = common.GlobalBatchSampler(len(ds), min(args.batch_size, len(ds)), args.seed, rank, world)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=args.workers, pin_memory=cuda,
                                             persistent_workers=args.workers > 0)
        images = tr.images.to(dev) if tr.in_memory else None
    else:  # local batches from this rank's shard: shards differ by at most one row, so steps x local <= every shard
        local = min(args.batch_size, len(tr)) // world
        steps = len(tr) // (local * world)

    def frozen_features(batch):
        with common.eval_autocast(dev):
            return net(common.device_views(batch, images, data.mean, data.std, [size], dev, cuda)[0]).float()

    for epoch in range(args.epochs):
        if args.precompute:
            g = torch.Generator().manual_seed((args.seed * 1000 + epoch) * 1000 + rank)
            perm = torch.randperm(len(tr_f), generator=g)[:steps * local].to(dev)
            batches = ((tr_f[b].float(), y_tr[b]) for b in perm.split(local))
        else:
            ds.epoch.fill_(epoch)
            sampler.set_epoch(epoch)
            batches = ((frozen_features(b), b["label"].to(dev, non_blocking=True)) for b in loader)
        for f, y in batches:
            loss = F.cross_entropy(ddp(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            head.eval()
            with torch.no_grad():
                ranked = torch.cat([head(c.float()).topk(min(5, C), dim=1).indices for c in te_f.split(4096)])
                top1, top5 = common.topk_accuracy(ranked, te.labels)
            head.train()
            best = max(best, top1)
            common.print0(f"  linear epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f} top-1 {top1:.2f} top-5 {top5:.2f}")
    res.update(linear_top1=top1, linear_top5=top5, linear_best_top1=best)
    return res


def report(results, args):
    """Markdown table on stdout; with several runs also comparison.png."""
    cols = ["linear_top1", "linear_top5", "knn_top1", "knn_top5"]
    print("| run | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for path, r in results.items():
        print(f"| {path} | " + " | ".join(f"{r[c]:.2f}" if r.get(c) is not None else "-" for c in cols) + " |")
    if len(results) > 1:
        plt = common._plt()
        out = args.out or (args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0]) or ".")
        os.makedirs(out, exist_ok=True)
        names = [os.path.basename(os.path.normpath(p)) for p in results]
        fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.2))
        w = 0.38
        for j, c in enumerate(["linear_top1", "knn_top1"]):
            vals = [r.get(c) or 0 for r in results.values()]
            ax.bar([i + (j - 0.5) * w for i in range(len(names))], vals, w, label=c)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
        ax.set(ylabel="top-1 (%)", title=f"{args.dataset}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "comparison.png"), dpi=100)
        plt.close(fig)
        print(f"wrote {os.path.join(out, 'comparison.png')}")


def main(argv=None):
    common.launch(run, parse(argv))


if __name__ == "__main__":
    main()
