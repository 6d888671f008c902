"""linear_eval.py: linear probe, kNN and semi-supervised fine-tuning for any checkpoint of this repository.

Linear probe, frozen backbone in eval mode, on its pooled features standardised by the mean and std of the training
features (a fixed affine map, so the classifier stays linear and its lr does not depend on the feature scale):
- `--protocol sweep` (default; our choice, as DINO's eval_linear): 7 heads, one per lr in 0.001 ... 1.0, trained side
  by side on the same batches (SGD, momentum 0.9, no weight decay, batch 256, 100 epochs, cosine to 0). A seeded,
  class-balanced 10 % of the training images is held out; the head with the best held-out top-1 at the last epoch
  wins (ties: the smaller lr), among the heads whose last-epoch training loss is below ln(C), the loss of a uniform
  guess (a head above it has diverged). Reported: that head's test top-1/top-5 at its last epoch. The test set
  chooses nothing. On standardised features the curvature of the loss is at most (D + 1) / 2 (every dimension one
  signal), so lr 0.001 stays under momentum SGD's stability bound on that curvature, 2 (1 + 0.9) / ((D + 1) / 2), up
  to D = 2048: the smallest head learns even in that worst case (tested), where the large lrs blow up.
- `--protocol paper`: one head, 100 epochs, lr x0.1 at 60 % and 80 %, all training images, test top-1 at the last
  epoch: lr 10 with batch 512 on small datasets (ContrastiveCrop Table 1), lr 30 with batch 256 on ImageNet (MoCo).
Training images get RandomResizedCrop + flip; --precompute instead caches the features of un-augmented images once
(much faster, on CPU too; slightly lower accuracy), fp16, each rank its own shard (ImageNet, ResNet-50, 8 GPUs:
656 MB per GPU). kNN: k=20, T=0.07, cosine, weighted votes, the memory bank sharded over ranks.
On CUDA the frozen backbone runs in bf16 autocast and channels_last, as in training; the heads are trained with DDP.

--finetune --labels 1%|10%|FILE: SimCLR's semi-supervised protocol (App. B.5) instead of the probe: the whole backbone
and a new zero-initialised linear head, on a seeded, class-balanced subset of the labelled training images (the same
number per class, at least 1; or the images a file names, one file name a line, e.g. SimCLR's imagenet_subsets/
1percent.txt), random crop + flip only, SGD with Nesterov momentum 0.9, lr 0.05 x batch/256, batch 256 (the subset if
smaller), no weight decay, 60 epochs for 1 % and 30 for 10 %, cosine (our choice), BN in train mode (SyncBN on several
GPUs; per process over gloo), test top-1 on centre crops. The checkpoint file is only read.

    python linear_eval.py runs/leoclr-cifar10 --dataset cifar10 --data DIR
    # table + comparison.png
    python linear_eval.py runs/logo-cifar10 runs/leoclr-cifar10 --dataset cifar10 --data DIR --precompute
    python linear_eval.py runs/clim-imagenet --dataset imagenet --data DIR --gpus 8 --protocol paper
    python linear_eval.py runs/clim-imagenet --dataset imagenet --data DIR --gpus 8 --finetune --labels 1percent.txt
    python linear_eval.py runs/x --dataset synthetic --knn-only

Last stdout line: one JSON object {"dataset", "runs": {run: {"knn_top1", "knn_top5", "linear_top1", "linear_top5",
"linear_lr", "linear_heldout_top1" (null with --protocol paper), "linear_loss"}}}; with --finetune "finetune_top1",
"finetune_top5", "finetune_images" replace the linear keys.
"""
import copy, math, os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

PROTOCOLS = {  # the linear probe: lrs (one head each), global batch, epochs, lr schedule
    "sweep": dict(lrs=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0), batch_size=256, epochs=100, schedule="cosine"),
    "paper-small": dict(lrs=(10.0,), batch_size=512, epochs=100, schedule="step"),      # ContrastiveCrop Table 1
    "paper-imagenet": dict(lrs=(30.0,), batch_size=256, epochs=100, schedule="step"),   # MoCo
}
HELDOUT = 0.1                                 # share of the training images that chooses the lr (sweep)
FINETUNE = dict(lr=0.05, batch_size=256)      # SimCLR App. B.5: lr 0.05 x batch/256, Nesterov, no weight decay


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
    a("--protocol", default="sweep", choices=["sweep", "paper"],
      help="sweep: 7 lrs side by side, chosen on a held-out 10%% of the training set (recommended); paper: lr 10 "
           "(small datasets) or 30 (ImageNet), steps at 60%% and 80%%, as the papers report")
    a("--epochs", type=int, default=None, help="linear-classifier epochs (100)")
    a("--lr", type=float, nargs="+", default=None,
      help="classifier lr(s), absolute: sweep 0.001 0.003 ... 1.0 (one head each); paper 10 small, 30 ImageNet")
    a("--batch-size", type=int, default=None,
      help="global batch: probe 256 (paper: 512 small datasets, 256 ImageNet); --finetune 256 (or the subset)")
    a("--knn-only", action="store_true", help="only the kNN classifier (seconds)")
    a("--knn-k", type=int, nargs="+", default=[20], help="kNN neighbours (20); more values add knn_top1_k<K> keys")
    a("--precompute", action="store_true", help="cache features of un-augmented images once; no augmentation")
    a("--finetune", action="store_true", help="fine-tune backbone + linear head on --labels, instead of the probe")
    a("--labels", default=None,
      help="with --finetune: 1%% or 10%% (class-balanced, seeded) or a file of training image names, one a line")
    a("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (60 for <= 5%% of the labels, else 30)")
    a("--finetune-lr", type=float, default=FINETUNE["lr"], help="fine-tuning lr per 256 images (0.05, SimCLR)")
    a("--size", type=int, default=None, help="input side (default: 32/64/96 native, 224 for ImageNet-like)")
    a("--gpus", type=int, default=1, help="GPUs (0 = CPU); under torchrun the environment decides")
    a("--device", dest="device_type", default="auto", choices=["auto", "cpu"],
      help="auto: CUDA when present; cpu: stay on the CPU (with --gpus N: N CPU processes over gloo)")
    a("--workers", type=int, default=None, help="data-loader workers")
    a("--seed", type=int, default=0, help="seed (held-out split, label subset, batches, crops)")
    a("--out", default=None, help="where comparison.png goes (default: the first run's folder)")
    a("--robustness", action="store_true",
      help="after the probe, its test top-1 under Gaussian noise, zeroed feature-map positions and FGSM/PGD attacks "
           "(CO-SSL's robustness claims): a table and robustness.png")
    a("--robust-images", type=int, default=0, help="test images for the --robustness rows (0: all; evenly spaced)")
    args = p.parse_args(argv)
    if args.dataset not in common.DATASETS:
        common.fail(f"unknown dataset '{args.dataset}'; choose one of {', '.join(common.DATASETS)}")
    if args.finetune != (args.labels is not None):
        common.fail("--finetune and --labels go together: --finetune --labels 1% (or 10%, or a file of image names)")
    if args.finetune and args.knn_only:
        common.fail("--finetune and --knn-only exclude each other; drop one")
    if args.labels and args.labels.endswith("%"):
        try:
            pct = float(args.labels[:-1])
        except ValueError:
            pct = -1.0
        if not 0 < pct <= 100:
            common.fail(f"--labels {args.labels}: give a percentage in (0, 100], e.g. 1% or 10%, or a file of names")
    if args.robustness and (args.knn_only or args.finetune):
        common.fail("--robustness measures the linear probe: drop --knn-only / --finetune")
    if args.protocol == "paper" and args.lr and len(args.lr) > 1:
        common.fail("--protocol paper trains one head: pass one --lr (10 small datasets, 30 ImageNet)")
    common.check_ranges(p, args)  # the numeric flags, as in every training script
    return args


def probe_settings(args, size):
    """The protocol's lrs, batch, epochs and schedule; --lr, --batch-size and --epochs override them."""
    name = args.protocol if args.protocol == "sweep" else "paper-small" if size < 160 else "paper-imagenet"
    s = dict(PROTOCOLS[name])
    s.update({k: v for k, v in [("lrs", args.lr and tuple(args.lr)), ("batch_size", args.batch_size),
                                ("epochs", args.epochs)] if v})
    return s


def lr_factor(schedule, step, steps_per_epoch, epochs):
    """cosine: per step from 1 to 0; step: x0.1 at 60 % and 80 % of the epochs (MoCo's 60/80 of 100)."""
    if schedule == "cosine":
        return common.lr_factor(step, steps_per_epoch, epochs)
    e = step // steps_per_epoch
    return 0.1 ** ((e >= int(0.6 * epochs)) + (e >= int(0.8 * epochs)))


# ================================================================ which images: held-out split, label subsets

def balanced_subset(labels, fraction, seed, leave=0):
    """Sorted indices of a class-balanced, seeded subset: k = max(1, floor(fraction x N / C)) images of every class
    present (all but `leave` of a class that has fewer), the first k of a seeded permutation of the class. A pure
    function of (labels, fraction, seed): the same subset in every process, whatever their number."""
    classes, counts = labels.unique(return_counts=True)
    k = max(1, math.floor(round(fraction * len(labels) / len(classes), 9)))   # round: 0.29 x 100 is 28.999...
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c, n in zip(classes.tolist(), counts.tolist()):
        members = (labels == c).nonzero().squeeze(1)
        picked.append(members[torch.randperm(n, generator=g)[:max(0, min(k, n - leave))]])
    return torch.cat(picked).sort().values


def heldout_split(labels, fraction, seed):
    """-> (held: a mask over the N training rows, the class-balanced, seeded `fraction` that chooses the lr, each class
    keeping one image at least for training; the training rows of every rank, as positions in its shard_rows). The
    mask is the same whatever the number of processes, and every rank computes all of it."""
    held = torch.zeros(len(labels), dtype=torch.bool)
    if fraction:
        held[balanced_subset(labels, fraction, seed, leave=1)] = True
    shards = (common.shard_rows(len(labels), r) for r in range(common.get_world()))
    return held, [(~held[rows]).nonzero().squeeze(1) for rows in shards]


def named_subset(source, path):
    """Indices of the training images a file names (one file name a line, e.g. n01440764_10026.JPEG), matched
    against the base names of the training files."""
    try:
        with open(path) as f:
            names = [l.strip() for l in f if l.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise common.UserError(f"cannot read --labels {path} ({type(e).__name__}); pass 1%, 10% or a text file of "
                               "image names, one a line")
    if source.files is None:
        raise common.UserError(f"--labels {path} names files, but {source.name} has none; use --labels 1% or 10%")
    where = {os.path.basename(f): i for i, f in enumerate(source.files)}
    missing = [n for n in names if n not in where]
    if missing or not names:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise common.UserError(f"--labels {path}: {missing[0] if missing else 'no names'}{more} not found among the "
                               f"{len(source)} training images of {source.name}; check the list and --data")
    return torch.tensor(sorted({where[n] for n in names}), dtype=torch.long)


def labelled_subset(source, labels_arg, seed):
    """--labels 1% / 10% (class-balanced, seeded) or FILE -> indices into the labelled training set."""
    if labels_arg.endswith("%"):
        return balanced_subset(source.labels, float(labels_arg[:-1]) / 100, seed)
    return named_subset(source, labels_arg)


# ================================================================ heads and their training

class LinearHeads(nn.Module):
    """H linear classifiers side by side on the same standardised features: x (B x D) -> logits B x H x C.
    The standardisation is fixed ((x - mean) / std of the training features), so it folds into each classifier: still
    linear. Zero-initialised, as SimCLR's logits layer: every head starts from the same point."""

    def __init__(self, mean, std, num_classes, num_heads):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.linears = nn.ModuleList(nn.Linear(len(mean), num_classes) for _ in range(num_heads))
        for lin in self.linears:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        x = (x.float() - self.mean) / self.std
        return torch.stack([lin(x) for lin in self.linears], 1)


class FineTuned(nn.Module):
    """Backbone + a new linear head: images -> logits B x C; the backbone in bf16 autocast on CUDA, the head in fp32."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone, self.fc = backbone, nn.Linear(backbone.out_dim, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        with common.eval_autocast(x.device):
            f = self.backbone(x)
        return self.fc(f.float())


def train_sgd(model, groups, batches, epochs, steps_per_epoch, schedule, nesterov=False, on_epoch=None):
    """SGD (momentum 0.9, no weight decay) on the sum over heads of each head's cross-entropy; model(x) -> B x H x C
    logits (B x C: one head). Each head sees the same batches and only its own loss term reaches it, so H heads side by
    side train as H separate runs would. groups: optimizer groups with their base lr, scaled by lr_factor every step;
    batches(epoch) -> (inputs, labels). DDP over several processes. -> the mean training loss of each head over the
    last epoch (H), averaged over ranks."""
    dev, world = next(model.parameters()).device, common.get_world()
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if world > 1 else model
    opt = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, nesterov=nesterov, weight_decay=0.0)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    step = 0
    for epoch in range(epochs):
        total = 0.0
        for x, y in batches(epoch):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(schedule, step, steps_per_epoch, epochs)
            logits = ddp(x)
            logits = logits.view(len(y), -1, logits.shape[-1])                                       # B x H x C
            per_head = F.cross_entropy(logits.transpose(1, 2), y[:, None].expand(-1, logits.shape[1]),
                                       reduction="none").mean(0)                                        # H
            opt.zero_grad(set_to_none=True)
            per_head.sum().backward()
            opt.step()
            total, step = total + per_head.detach(), step + 1
        loss = total / steps_per_epoch
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        if on_epoch:
            on_epoch(epoch, loss)
    return loss


def choose_head(heldout_top1, losses, num_classes):
    """The head with the best held-out top-1 (ties: the first, i.e. the smaller lr) among those whose training loss is
    finite and below ln C, the loss of a uniform guess; if none is, among all."""
    ok = losses.isfinite() & (losses < math.log(num_classes))
    return int(torch.where(ok, heldout_top1, -1.0).argmax() if ok.any() else heldout_top1.argmax())


@torch.no_grad()
def heads_top1(heads, feats, labels):
    """Top-1 (%) of every head on this rank's rows, counted over all ranks: the same H numbers on every rank."""
    was = heads.training
    heads.eval()
    correct = torch.zeros(len(heads.linears), dtype=torch.float64, device=feats.device)
    for f, y in zip(feats.split(4096), labels.split(4096)):
        correct += (heads(f).argmax(-1) == y[:, None]).sum(0)
    counts = torch.cat([correct, torch.tensor([float(len(labels))], dtype=torch.float64, device=feats.device)])
    if common.get_world() > 1:
        dist.all_reduce(counts)
    heads.train(was)
    return 100.0 * counts[:-1] / counts[-1]


def feature_stats(feats, rows):
    """Mean and std per dimension of feats[rows] over every rank (fp64 sums, by chunks of rows: no copy of the shard);
    a constant dimension gets std 1."""
    s = torch.zeros(3, feats.shape[1], dtype=torch.float64, device=feats.device)
    for idx in rows.split(8192):
        c = feats[idx].double()
        s[0] += c.sum(0)
        s[1] += (c * c).sum(0)
    s[2] = len(rows)
    if common.get_world() > 1:
        dist.all_reduce(s)
    mean = s[0] / s[2]
    std = (s[1] / s[2] - mean * mean).clamp_min(0).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def augmented_batches(source, size, batch_size, data, args, transform):
    """epoch -> batches (transform(views), labels) of one RandomResizedCrop (0.08-1) + flip view per image, no colour
    changes; each rank takes its share of every global batch (GlobalBatchSampler). -> (batches, steps per epoch)."""
    dev, cuda = args.device, args.device.type == "cuda"
    ds = common.ViewDataset(source, common.Views(common.RandomResizedCrops(1, (0.08, 1.0)), [size],
                                                 [common.Recipe(p_jitter=0.0, p_gray=0.0)]), args.seed)
    sampler = common.GlobalBatchSampler(len(ds), batch_size, args.seed, common.get_rank(), common.get_world())
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=args.workers, pin_memory=cuda,
                                         persistent_workers=args.workers > 0)
    images = source.images.to(dev) if source.in_memory else None

    def batches(epoch):
        ds.epoch.fill_(epoch)
        sampler.set_epoch(epoch)
        for b in loader:
            views = common.device_views(b, images, data.mean, data.std, [size], dev, cuda)[0]
            yield transform(views), b["label"].to(dev, non_blocking=True)
    return batches, sampler.batches_per_epoch()


# ================================================================ evaluation

def run(args):
    common.seed_everything(args.seed)
    data = common.load_data(args)
    if data.knn_val is None:
        raise common.UserError(f"{args.dataset} at {args.data} has no labelled train/val split to evaluate on")
    if args.workers is None:
        args.workers = common.default_workers(data.knn_train.in_memory, args)
    size = args.size or common.view_size(args, SimpleNamespace(train=data.knn_train))  # the training scripts' rule
    subset = labelled_subset(data.knn_train, args.labels, args.seed) if args.finetune else None
    results = {}
    for path in args.runs:
        net, meta = common.load_backbone(path, args.arch)
        net = net.to(args.device).eval().requires_grad_(False)
        if args.device.type == "cuda":  # as training: faster convolutions under bf16
            net = net.to(memory_format=torch.channels_last)
        frozen = copy.deepcopy(net.state_dict())
        common.print0(f"{path}: {meta.get('method')} {meta.get('arch')} ({meta.get('stem')} stem), "
                      f"epoch {meta.get('epoch')}")
        seen = common.with_stats(data, (meta["mean"], meta["std"]) if meta.get("mean") else None)  # as trained
        res = evaluate(net, seen, args, size)
        for k, v in net.state_dict().items():  # the probe must not touch the backbone (moco-v3 habit)
            assert torch.equal(v, frozen[k]), f"backbone changed during linear evaluation: {k}"
        if args.finetune:
            res.update(finetune(net, seen, args, size, subset))
        results[path] = res
        common.print0(f"{path}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items() if isinstance(v, (int, float))))
    if common.is_main():
        report(results, args)
    common.finish({"dataset": args.dataset, "runs": results})


def evaluate(net, data, args, size):
    """kNN, then the linear probe. Each rank holds its shard of the training features and all test features, both
    fp16: on ImageNet with ResNet-50 and 8 ranks 656 MB + 205 MB per rank instead of 2 x 10.5 GB of fp32 features.
    Frozen forwards run under bf16 autocast on CUDA (fp32 on CPU); the heads stay fp32, their cost is negligible."""
    dev, tr, te = args.device, data.knn_train, data.knn_val
    tr_f = common.extract_features(net, tr, size, data.mean, data.std, dev, workers=args.workers, shard=True,
                                   dtype=torch.float16)                                        # N_rank x D
    rows = common.shard_rows(len(tr))
    y_tr = tr.labels[rows].to(dev)
    te_f = common.extract_features(net, te, size, data.mean, data.std, dev, workers=args.workers, dtype=torch.float16)
    C = int(max(tr.labels.max(), te.labels.max())) + 1
    res = {}
    for j, k in enumerate(args.knn_k):
        knn1, knn5 = common.topk_accuracy(common.knn_classify(tr_f, y_tr, te_f, C, k), te.labels)
        res.update({"knn_top1": knn1, "knn_top5": knn5} if j == 0 else {f"knn_top1_k{k}": knn1})
    if args.knn_only or args.finetune:
        return res

    s = probe_settings(args, size)
    sweep, world, rank = args.protocol == "sweep", common.get_world(), common.get_rank()
    held, train_rows = heldout_split(tr.labels, HELDOUT if sweep else 0.0, args.seed)
    mine, held_mine = train_rows[rank].to(dev), held[rows].nonzero().squeeze(1).to(dev)
    mean, std = feature_stats(tr_f, mine)
    heads = LinearHeads(mean, std, C, len(s["lrs"])).to(dev)
    held_f, held_y = tr_f[held_mine], y_tr[held_mine]
    if args.precompute:  # local batches from this rank's training rows; every rank takes the same number of steps
        local = min(s["batch_size"], int(held.numel() - held.sum())) // world
        batch, steps = local * world, min(len(r) for r in train_rows) // max(local, 1)
        if steps == 0:
            raise common.UserError(f"--batch-size {s['batch_size']} leaves no full batch per process; lower it")

        def batches(epoch):
            g = torch.Generator().manual_seed((args.seed * 1000 + epoch) * 1000 + rank)
            perm = mine[torch.randperm(len(mine), generator=g)[:steps * local].to(dev)]
            return ((tr_f[b], y_tr[b]) for b in perm.split(local))
    else:  # augmented views of the training rows: only the held-out and test features are needed from here on
        del tr_f

        @torch.no_grad()
        def frozen(views):
            with common.eval_autocast(dev):
                return net(views).float()
        train_src = tr.rows((~held).nonzero().squeeze(1))
        batch = min(s["batch_size"], len(train_src)) // world * world
        batches, steps = augmented_batches(train_src, size, batch, data, args, frozen)
    n_held = int(held.sum())
    common.print0(f"  linear probe ({args.protocol}): lr {' '.join(f'{lr:g}' for lr in s['lrs'])}, batch "
                  f"{batch}, {s['epochs']} epochs ({s['schedule']}), {len(tr) - n_held} training images"
                  + (f", {n_held} held out" if sweep else "") + (", precomputed features" if args.precompute else ""))

    def progress(epoch, loss):
        if (epoch + 1) % 10 == 0 or epoch + 1 == s["epochs"]:
            line = f"  linear epoch {epoch + 1}/{s['epochs']}: loss " + " ".join(f"{v:.3f}" for v in loss.tolist())
            if sweep:
                line += " | held-out top-1 " + " ".join(f"{v:.1f}" for v in heads_top1(heads, held_f, held_y).tolist())
            common.print0(line)
    groups = [{"params": lin.parameters(), "lr": lr} for lin, lr in zip(heads.linears, s["lrs"])]
    loss = train_sgd(heads, groups, batches, s["epochs"], steps, s["schedule"], on_epoch=progress)
    heldout = heads_top1(heads, held_f, held_y) if sweep else None
    h = choose_head(heldout, loss, C) if sweep else 0
    heads.eval()
    with torch.no_grad():   # the test set, once: the chosen head at its last epoch
        ranked = torch.cat([heads(c)[:, h].topk(min(5, C), dim=1).indices for c in te_f.split(4096)])
    top1, top5 = common.topk_accuracy(ranked, te.labels)
    res.update(linear_top1=top1, linear_top5=top5, linear_lr=s["lrs"][h], linear_loss=loss[h].item(),
               linear_heldout_top1=heldout[h].item() if sweep else None)
    common.print0(f"  linear: lr {s['lrs'][h]:g}" + (f", held-out top-1 {heldout[h]:.2f}" if sweep else "")
                  + f", training loss {loss[h]:.4f}: test top-1 {top1:.2f} top-5 {top5:.2f}")
    if args.robustness:
        res["robustness"] = robustness(net, lambda f: heads(f)[:, h], data, args, size)
    return res


# ---- --robustness: CO-SSL's claims (noise, internal corruption, small adversarial attacks), on the probe's test set

ROBUSTNESS = {"noise": [0.05, 0.1, 0.2],              # std of Gaussian pixel noise (pixels in [0, 1]), clamped
              "internal": [0.25, 0.5, 0.75],          # fraction of the last feature map's positions zeroed
              "fgsm": [1 / 255, 2 / 255, 4 / 255],    # L-inf radius in pixels: one signed-gradient step
              "pgd": [1 / 255, 2 / 255, 4 / 255]}     # the same radius, 10 steps of radius / 4, no random start
PGD_STEPS = 10


def corrupted_logits(kind, strength, net, head, x, y, gen, mean, std):
    """The probe's logits for a batch x (normalised pixels) corrupted by `kind` at `strength`. gen(i) gives image i's
    generator (noise and masks depend on the image and the seed, not on the batch or the number of processes)."""
    pix = x * std + mean                                                       # back to [0, 1]
    if kind == "noise":
        noise = torch.stack([torch.randn(x.shape[1:], generator=gen(i)) for i in range(len(x))]).to(x.device)
        return head(net(((pix + strength * noise).clamp(0, 1) - mean) / std))
    if kind == "internal":
        fm = common.feature_map(net, x)
        hw = fm.shape[-2] * fm.shape[-1]
        keep = torch.stack([torch.randperm(hw, generator=gen(i)) >= round(strength * hw) for i in range(len(x))])
        fm = fm * keep.view(len(x), 1, *fm.shape[-2:]).to(fm.device, fm.dtype)
        return head(net.fc(fm.mean((2, 3))))                                   # the backbone's own pooling + fc
    adv = pix.clone()
    steps, alpha = (1, strength) if kind == "fgsm" else (PGD_STEPS, strength / 4)
    for _ in range(steps):
        with torch.enable_grad():
            adv.requires_grad_(True)
            loss = F.cross_entropy(head(net((adv - mean) / std)).float(), y)
            grad, = torch.autograd.grad(loss, adv)
        adv = (adv.detach() + alpha * grad.sign()).clamp(pix - strength, pix + strength).clamp(0, 1)
    return head(net((adv - mean) / std))


def robustness(net, head, data, args, size):
    """Test top-1 of the probe (head on the frozen backbone) under each ROBUSTNESS corruption and strength: the same
    sharded pass as every evaluation (common.extract_features), the corruption applied inside it."""
    te = data.knn_val
    if args.robust_images:
        te = te.rows(torch.linspace(0, len(te) - 1, min(args.robust_images, len(te))).round().long())
    mean = common._channel_constant(tuple(data.mean), args.device)
    std = common._channel_constant(tuple(data.std), args.device)
    out = {}
    for kind, strengths in ROBUSTNESS.items():
        out[kind] = {}
        for strength in strengths:
            mine, seen = common.shard_rows(len(te)), [0]
            idx = [*range(mine.start, mine.stop)]
            idx += [len(te) - 1] * (math.ceil(len(te) / common.get_world()) - len(idx))  # padded as the pass pads

            def fn(net, x):  # the pass visits idx in order, batch by batch
                rows, seen[0] = idx[seen[0]:seen[0] + len(x)], seen[0] + len(x)
                gen = lambda j: torch.Generator().manual_seed(args.seed * 10 ** 9 + rows[j])
                y = te.labels[rows].to(x.device)
                return corrupted_logits(kind, strength, net, head, x.float(), y, gen, mean, std)
            logits = common.extract_features(net, te, size, data.mean, data.std, args.device, workers=args.workers,
                                             fn=fn)
            top1, _ = common.topk_accuracy(logits.topk(min(5, logits.shape[1]), dim=1).indices, te.labels)
            out[kind][f"{round(strength * 255)}/255" if kind in ("fgsm", "pgd") else f"{strength:g}"] = top1
        common.print0(f"  robustness, {kind}: " + ", ".join(f"{k} -> {v:.2f}" for k, v in out[kind].items()))
    return out


def finetune(net, data, args, size, subset):
    """SimCLR App. B.5 on the labelled subset: backbone + new head in train mode, Nesterov SGD, cosine (our choice),
    then test top-1/top-5 on centre crops. SyncBN on several GPUs (SimCLR's global BN); gloo keeps per-process BN."""
    dev, world, tr, te = args.device, common.get_world(), data.knn_train, data.knn_val
    src = tr.rows(subset)
    C = int(max(tr.labels.max(), te.labels.max())) + 1
    bs = min(args.batch_size or FINETUNE["batch_size"], len(src))
    bs -= bs % world
    if bs == 0:
        raise common.UserError(f"--labels {args.labels} gives {len(src)} images, fewer than the {world} processes")
    epochs = args.finetune_epochs or (60 if len(src) <= 0.05 * len(tr) else 30)
    lr = args.finetune_lr * bs / 256
    model = FineTuned(net.train().requires_grad_(True), C).to(dev)
    if world > 1 and dev.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    common.print0(f"  fine-tuning on {len(src)} labelled images ({args.labels}, {len(src) / len(tr):.1%} of "
                  f"{len(tr)}): batch {bs}, lr {lr:.4g}, {epochs} epochs")
    batches, steps = augmented_batches(src, size, bs, data, args, lambda views: views)

    def progress(epoch, loss):
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            common.print0(f"  finetune epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    train_sgd(model, [{"params": model.parameters(), "lr": lr}], batches, epochs, steps, "cosine", nesterov=True,
              on_epoch=progress)
    if world > 1:  # per-process BN (gloo) leaves each rank its own running statistics: evaluate with rank 0's
        for b in model.buffers():
            dist.broadcast(b, 0)
    logits = common.extract_features(model, te, size, data.mean, data.std, dev, workers=args.workers)  # eval mode
    top1, top5 = common.topk_accuracy(logits.topk(min(5, C), dim=1).indices, te.labels)
    return {"finetune_top1": top1, "finetune_top5": top5, "finetune_images": len(src)}


def report(results, args):
    """Markdown table on stdout; with several runs also comparison.png."""
    first = ["finetune_top1", "finetune_top5"] if args.finetune else ["linear_top1", "linear_top5"]
    cols = first + ["knn_top1", "knn_top5"]
    print("| run | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for path, r in results.items():
        print(f"| {path} | " + " | ".join(f"{r[c]:.2f}" if r.get(c) is not None else "-" for c in cols) + " |")
    robust = {path: r["robustness"] for path, r in results.items() if r.get("robustness")}
    if robust:
        robustness_report(robust, {path: r["linear_top1"] for path, r in results.items()}, args)
    if len(results) > 1:
        plt = common._plt()
        out = args.out or (args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0]) or ".")
        os.makedirs(out, exist_ok=True)
        names = [os.path.basename(os.path.normpath(p)) for p in results]
        fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.2))
        w = 0.38
        for j, c in enumerate([first[0], "knn_top1"]):
            vals = [r.get(c) or 0 for r in results.values()]
            ax.bar([i + (j - 0.5) * w for i in range(len(names))], vals, w, label=c)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
        ax.set(ylabel="top-1 (%)", title=f"{args.dataset}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "comparison.png"), dpi=100)
        plt.close(fig)
        print(f"wrote {os.path.join(out, 'comparison.png')}")


def robustness_report(robust, clean, args):
    """The --robustness table (clean top-1, then each corruption and strength) and robustness.png: top-1 against
    strength, one panel per corruption, one line per run."""
    cols = [(kind, k) for kind in ROBUSTNESS for k in next(iter(robust.values()))[kind]]
    print("| run | clean | " + " | ".join(f"{kind} {k}" for kind, k in cols) + " |\n|---|---|" + "---|" * len(cols))
    for path, r in robust.items():
        print(f"| {path} | {clean[path]:.2f} | " + " | ".join(f"{r[kind][k]:.2f}" for kind, k in cols) + " |")
    plt = common._plt()
    out = args.out or (args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0]) or ".")
    os.makedirs(out, exist_ok=True)
    fig, axes = plt.subplots(1, len(ROBUSTNESS), figsize=(3.2 * len(ROBUSTNESS), 3))
    units = {"noise": "noise std", "internal": "fraction of positions zeroed", "fgsm": "FGSM radius (x255)",
             "pgd": f"PGD-{PGD_STEPS} radius (x255)"}
    for ax, kind in zip(axes, ROBUSTNESS):
        for path, r in robust.items():
            xs = [0] + [float(k.split("/")[0]) for k in r[kind]]  # attacks: radius x 255
            ax.plot(xs, [clean[path]] + list(r[kind].values()), marker="o",
                    label=os.path.basename(os.path.normpath(path)))
        ax.set(xlabel=units[kind], ylabel="test top-1 (%)", title=kind)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "robustness.png"), dpi=100)
    plt.close(fig)
    print(f"wrote {os.path.join(out, 'robustness.png')}")


def main(argv=None):
    common.launch(run, parse(argv))


if __name__ == "__main__":
    main()
