"""CLIM: Center-wise Local Image Mixture for Contrastive Representation Learning.
Li, Zhang, Xiong, BMVC 2021, arXiv 2011.02697. Base method: MoCo-v2 (arXiv 2003.04297). No official code.

Idea. MoCo-v2 treats every other image as a negative. CLIM also draws positives from other images: every few
epochs it embeds the training set with the momentum encoder f_k, clusters it (spherical k-means) and keeps for
each anchor i those of its k nearest neighbours that lie in i's cluster *and* closer to the cluster centre than i
("center-wise local selection"). A selected neighbour j is used only through CutMix with the anchor: the mixed
query must match the anchor's key and j's key in proportion to their pixel shares, a soft positive. Extra
lower-resolution queries of the anchor add scale invariance (multi-resolution, MR); all InfoNCE terms are averaged.

Paper -> code (the notation of the paper's Sec. 3):
  l(u, v) against the queue (MoCo InfoNCE)  -> nce (= common.info_nce)
  L_mix = mean lam l(q~, k) + (1 - lam) l(q~, k~) -> mix_nce
  L = (L_ins + L_mix + sum_s L_s) / (2 + |S|) -> total_loss
  CutMix (lambda from the clipped box) / Mixup -> cutmix, mix_views
  selection: bank Z, spherical k-means, kNN, center rule -> embed_bank, spherical_kmeans, knn, select_neighbours
  worker side: draw j uniformly from T[i]    -> neighbour_sources

Commands:
  python clim.py --dataset synthetic --subset 512 --batch-size 64 --epochs 4 --stem imagenet --clusters 8 \\
      --select-start 1 --select-every 1 --gpus 0                                   # CPU smoke (minutes)
  python clim.py --dataset cifar10 --data ./data --download                        # 1 GPU, 500 epochs
  python clim.py --dataset imagenet --data /path/to/imagenet --gpus 8 --workers 10 # 8 GPUs, ResNet-50, 200 epochs
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 clim.py --dataset imagenet --data DIR --workers 10
  python clim.py --dataset cifar10 --data ./data --baseline                        # MoCo-v2 with the same settings
  python clim.py --dataset cifar10 --data ./data --show-views                      # views.png + selection_eXXXX.png
"""
import functools, os, random, sys, time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import common

BLOCK = 2 ** 28  # most entries of one similarity block (kNN, k-means): 1 GiB in fp32, never N x N


# ================================================================ losses (fp32)

nce = common.info_nce  # l(u, v) averaged over the batch: CE([u.v, u.Q^T] / tau, 0); logits B x (1+K). L_ins, L_s


@common.fp32
def mix_nce(q_mix, k, k_n, lam, queue, temperature):
    """L_mix = mean_b [lam_b l(q~_b, k_b) + (1 - lam_b) l(q~_b, k~_b)]; both terms share the negatives q~ Q^T.
    q_mix, k, k_n: B x D unit rows; lam: B; queue: K x D. k, k~, lam and the queue carry no gradient."""
    q_mix, lam = q_mix.float(), lam.detach().float()
    k, k_n, queue = k.detach().float(), k_n.detach().float(), queue.detach().float()
    neg = torch.logsumexp(q_mix @ queue.T / temperature, dim=1)                   # B: log sum_n e^{q~.Q_n/tau}
    pos = torch.stack([(q_mix * k).sum(1), (q_mix * k_n).sum(1)], 1) / temperature  # B x 2
    ell = torch.logaddexp(pos, neg[:, None]) - pos                                # B x 2: -log softmax of the positive
    return (lam * ell[:, 0] + (1 - lam) * ell[:, 1]).mean()


def total_loss(l_ins, l_mix, l_scales):
    """L = (L_ins + L_mix + sum_s L_s) / (2 + |S|): the mean keeps the baseline's loss scale (effective lr).
    l_mix None (--baseline, optionally with MR views): the mean of the remaining terms."""
    terms = [l_ins] + ([] if l_mix is None else [l_mix]) + list(l_scales)
    return sum(terms) / len(terms)


# ================================================================ views and the mixture

def cutmix(x_q, x_n, lam0, centre):
    """CutMix (Yun et al. 2019), one box per sample: side S0 sqrt(1 - lam0) around `centre` (B x 2, pixels (y, x)),
    clipped to the image; lam = 1 - clipped area / S0^2 is the anchor's exact pixel share.
    x_q, x_n: B x 3 x S0 x S0 -> x_mix, lam (B), boxes B x 4 (y1, x1, y2, x2)."""
    S = x_q.shape[-1]
    side = (S * (1 - lam0.float()).clamp(min=0).sqrt()).round()[:, None]      # B x 1
    lo = (centre.float() - side / 2).round()
    y1x1, y2x2 = lo.clamp(0, S), (lo + side).clamp(0, S)                       # B x 2 each, clipped corners
    r = torch.arange(S, device=x_q.device)
    inside = (r >= y1x1[:, :, None]) & (r < y2x2[:, :, None])                  # B x 2 x S: rows, columns
    mask = (inside[:, 0, :, None] & inside[:, 1, None, :]).unsqueeze(1)        # B x 1 x S x S
    lam = 1 - (y2x2 - y1x1).prod(1) / S ** 2
    return torch.where(mask, x_n, x_q), lam, torch.cat([y1x1, y2x2], 1)


def mix_views(mix, x_q, x_n, lam0, centre):
    """x_mix and lam for --mix cutmix (default) or mixup (x_mix = lam0 x_q + (1 - lam0) x_n, lam = lam0)."""
    if mix == "cutmix":
        return cutmix(x_q, x_n, lam0.to(x_q.device), centre.to(x_q.device))
    lam = lam0.to(x_q.device).float()
    return lam.view(-1, 1, 1, 1) * x_q + (1 - lam.view(-1, 1, 1, 1)) * x_n, lam, None


def view_names(baseline, mix, resolutions):
    """x_q, x_k: the anchor at S0; x_n (pasted), x_n2 (key): the neighbour j at S0; x_s: one anchor query per size."""
    names = ["x_q", "x_k"] + ([] if baseline else ["x_n"] + ([] if mix == "none" else ["x_n2"]))
    return names + [f"x_s{s}" for s in resolutions]


class CLIMViews:
    """MoCo-v2 RandomResizedCrop (scale 0.2-1) + flip per view; neighbour views crop source 1 when j != i.
    A class, so spawned workers can pickle it."""

    def __init__(self, names, scale=(0.2, 1.0)):
        self.names, self.scale = list(names), tuple(scale)

    def __call__(self, index, hw, rng):
        nb = len(hw) - 1  # neighbour_sources returns [i] alone when i has no candidate: then j = i
        srcs = [nb if n in ("x_n", "x_n2") else 0 for n in self.names]
        return [common.Crop(*common.rrc_box(*hw[s], self.scale, rng=rng), rng.random() < 0.5, s) for s in srcs]


def mix_params(size, alpha, index, rng):
    """Per-sample CutMix/Mixup draw (travels with the batch): lam0 ~ Beta(alpha, alpha), box centre uniform."""
    return {"mix_lam0": torch.tensor(rng.betavariate(alpha, alpha)),
            "mix_centre": torch.tensor([rng.uniform(0, size), rng.uniform(0, size)])}


def neighbour_sources(table, index, rng):
    """Worker side: j uniform over the candidates T[index] >= 0 (shared memory, updated in place); none -> [i]."""
    cands = [j for j in table[index].tolist() if j >= 0]
    return [index, cands[rng.randrange(len(cands))]] if cands else [index]


# ================================================================ center-wise local selection (paper Sec. 3)

def selects_at(epoch, start, every):
    """Selection schedule: a pass at start, start + every, ... (0-based epochs; random-init neighbours are noise)."""
    return epoch >= start and (epoch - start) % every == 0


@torch.no_grad()
def embed_bank(encoder, data, size, device, workers=0):
    """Z: f_k in eval mode on the un-augmented training images, fp32, unit rows, in dataset-index order. Each rank
    encodes its shard and f_k's BN statistics are averaged over ranks first (common.extract_features)."""
    z = common.extract_features(encoder, data.train, size, data.mean, data.std, device, workers=workers)
    return F.normalize(z.float(), dim=1)


def _assign(z, centres):
    rows = max(1, BLOCK // len(centres))
    return torch.cat([(c @ centres.T).argmax(1) for c in z.split(rows)])


@torch.no_grad()
def spherical_kmeans(z, clusters, iters, seed):
    """Lloyd on the sphere: a_i = argmax_m z_i.c_m, c_m = normalize(sum_{a_i=m} z_i); random distinct rows as the
    initial centres, empty clusters re-seeded with random rows. Deterministic: sums are one-hot matmuls in fixed
    blocks (no atomics). -> centres M x D (unit), assignments N (long)."""
    g = torch.Generator().manual_seed(seed)
    n, d = z.shape
    centres = z[torch.randperm(n, generator=g)[:clusters].to(z.device)].clone()
    zc = torch.cat([z, torch.ones(n, 1, device=z.device)], 1)                  # last column counts members
    for _ in range(iters):
        a = _assign(z, centres)
        sums = torch.zeros(clusters, d + 1, device=z.device)
        rows = max(1, BLOCK // clusters)
        for s in range(0, n, rows):
            onehot = torch.zeros(len(a[s:s + rows]), clusters, device=z.device).scatter_(1, a[s:s + rows, None], 1.0)
            sums += onehot.T @ zc[s:s + rows]                                   # M x (D + 1)
        centres = F.normalize(sums[:, :d], dim=1)
        empty = (sums[:, d] == 0).nonzero().flatten()
        if len(empty):
            centres[empty] = z[torch.randint(n, (len(empty),), generator=g).to(z.device)]
    return centres, _assign(z, centres)


@torch.no_grad()
def knn(z, rows, k, chunk=None):
    """NN_k(i) for the anchors `rows` by cosine against all of Z, self excluded, in blocks of <= BLOCK entries."""
    chunk = chunk or max(1, BLOCK // len(z))
    out = []
    for r in rows.split(chunk):
        sim = z[r] @ z.T                                                        # chunk x N
        sim[torch.arange(len(r), device=z.device), r] = float("-inf")
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


@torch.no_grad()
def select_neighbours(z, assign, centres, k, rule="center", rows=None, chunk=None):
    """P(i) for the anchors `rows` (default all), in kNN order, -1 padded -> int32 len(rows) x k. Rules:
    knn = NN_k(i); cluster = those in i's cluster; center = those in i's cluster with s_j > s_i, s = z.c_a."""
    rows = torch.arange(len(z), device=z.device) if rows is None else rows
    central = (z * centres[assign]).sum(1)                                      # s_i: cosine to the own centre
    nn_idx = knn(z, rows, k, chunk)
    keep = torch.ones_like(nn_idx, dtype=torch.bool)
    if rule in ("cluster", "center"):
        keep &= assign[nn_idx] == assign[rows, None]
    if rule == "center":
        keep &= central[nn_idx] > central[rows, None]                           # strictly closer than the anchor
    order = (~keep).to(torch.uint8).sort(dim=1, stable=True).indices            # kept first, kNN order kept
    return nn_idx.gather(1, order).masked_fill(~keep.gather(1, order), -1).int()


@torch.no_grad()
def selection_pass(encoder, data, size, args, clusters, epoch):
    """Bank -> k-means on rank 0 (broadcast) -> each rank a contiguous slice of anchors -> all_gather T."""
    dev, W, r = args.device, common.get_world(), common.get_rank()
    z = embed_bank(encoder, data, size, dev, args.workers)
    n = len(z)
    if r == 0:
        centres, assign = spherical_kmeans(z, clusters, args.kmeans_iters, args.seed + epoch)
    else:
        centres, assign = torch.empty(clusters, z.shape[1], device=dev), torch.empty(n, dtype=torch.long, device=dev)
    if W > 1:
        dist.broadcast(centres, 0)
        dist.broadcast(assign, 0)
    per = -(-n // W)
    rows = torch.arange(r * per, (r + 1) * per, device=dev).clamp(max=n - 1)   # padded: every rank has `per` rows
    table = common.gather_no_grad(select_neighbours(z, assign, centres, args.knn, args.select, rows))[:n]
    return dict(z=z, centres=centres, assign=assign, central=(z * centres[assign]).sum(1), table=table)


def selection_stats(table, labels=None):
    """Fraction of anchors with a neighbour, mean |P(i)|, and (labels, logging only) the expected label agreement
    of the drawn neighbour: per anchor the fraction of its candidates sharing its class, averaged."""
    valid = table >= 0
    has = valid.any(1)
    stats = {"has_neighbour": has.float().mean().item(), "candidates": valid.sum(1).float().mean().item()}
    if labels is not None and has.any():
        same = (labels[table.clamp(min=0).long()] == labels[:, None]) & valid
        stats["label_agreement"] = (same.sum(1) / valid.sum(1).clamp(min=1))[has].float().mean().item()
    return stats


class NeighbourSelection(common.State):
    """Selection state outside the DDP module (never buffers: DDP would broadcast them): the shared int32 table T
    (N x k, -1 padded) the workers read, assignments a, centres C, the last pass's epoch. Saved in the checkpoint."""

    def __init__(self, args, data, model, size, clusters):
        n = len(data.train)
        self.table = torch.full((n, args.knn), -1, dtype=torch.int32).share_memory_()  # before the loader exists
        self.assign, self.centres = torch.full((n,), -1, dtype=torch.int32), torch.zeros(clusters, 128)
        self.last_select_epoch, self.stats = -1, {}
        self.args, self.data, self.model, self.size, self.clusters = args, data, model, size, clusters
        self.labels = data.train.labels if data.train.has_labels else None
        self.sources = functools.partial(neighbour_sources, self.table)

    def before_epoch(self, epoch):
        a = self.args
        if a.select != "none" and selects_at(epoch, a.select_start, a.select_every):
            self.select(epoch)

    def select(self, epoch):
        t0 = time.time()
        res = selection_pass(self.model.encoder_k, self.data, self.size, self.args, self.clusters, epoch)
        self.table.copy_(res["table"].cpu())                                    # in place: workers see it
        self.assign.copy_(res["assign"].cpu())
        self.centres.copy_(res["centres"].cpu())
        self.last_select_epoch, self.stats = epoch, selection_stats(self.table, self.labels)
        s = self.stats
        common.print0(f"selection at epoch {epoch}: {100 * s['has_neighbour']:.1f}% of anchors have a neighbour, "
                      f"{s['candidates']:.2f} candidates on average"
                      + (f", label agreement {100 * s['label_agreement']:.1f}%" if "label_agreement" in s else "")
                      + f" ({self.args.select}, M {self.clusters}, k {self.args.knn}; {time.time() - t0:.1f} s)")
        if common.is_main():
            draw_selection(os.path.join(self.args.out, f"selection_e{epoch:04d}.png"), self.data, res, epoch,
                           self.args.seed)

    def config(self):
        return [self.clusters, self.args.knn, self.args.select]

    def state_dict(self):
        return {"table": self.table.clone(), "assign": self.assign.clone(), "centres": self.centres.clone(),
                "last_select_epoch": self.last_select_epoch, "stats": dict(self.stats), "config": self.config()}

    def load_state_dict(self, sd):
        if sd["config"] != self.config():
            raise common.UserError(f"the checkpoint's selection has (M, k, rule) = {sd['config']}, this run "
                                   f"{self.config()}; use the same --clusters/--knn/--select or another --out")
        self.table.copy_(sd["table"])
        self.assign.copy_(sd["assign"])
        self.centres.copy_(sd["centres"])
        self.last_select_epoch, self.stats = sd["last_select_epoch"], dict(sd["stats"])

    def epoch_logs(self):
        return {"select_epoch": self.last_select_epoch, **{f"select_{k}": v for k, v in self.stats.items()}}


# ================================================================ model

class CLIM(common.MoCoV2):
    """MoCo-v2 (f_q; f_k = EMA(f_q) with shuffle-BN keys; queue of K keys) plus the mixed positive and MR queries.
    forward(views in view_names order, batch) -> (loss, logs); --baseline: x_q, x_k (and x_s) only."""

    def __init__(self, backbone, names, queue_size, temperature, momentum, mix):
        d = backbone.out_dim
        super().__init__(backbone, [d, d, 128], queue_size, temperature, momentum)  # head d-d-128 [base method]
        self.names, self.mix = names, mix

    def forward(self, views, batch):
        v, t, logs = dict(zip(self.names, views)), self.temperature, {}
        common.ema_update(self.encoder_k, self.encoder_q, self.momentum)  # where common's MoCo-v2 does it
        negatives = self.queue.queue.clone()                              # every logit uses the pre-enqueue queue
        q = self.query(v["x_q"])                                          # separate passes: the instance branch
        q_scales = [self.query(v[n]) for n in self.names if n.startswith("x_s")]  # keeps the baseline's BN stats
        if "x_n" in v and self.mix == "none":
            q_mix = self.query(v["x_n"])                                  # --mix none: the neighbour as hard positive
        elif "x_n" in v:
            x_mix, lam, _ = mix_views(self.mix, v["x_q"], v["x_n"], batch["mix_lam0"], batch["mix_centre"])
            q_mix, logs["lambda"] = self.query(x_mix), lam.mean()
        k = self.keys(v["x_k"])                                           # no grad, shuffle-BN
        l_ins, l_mix = nce(q, k, negatives, t), None
        if "x_n" in v:
            l_mix = nce(q_mix, k, negatives, t) if self.mix == "none" else \
                mix_nce(q_mix, k, self.keys(v["x_n2"]), lam, negatives, t)
            j = batch["src"][:, self.names.index("x_n")].to(q.device, non_blocking=True)
            logs["has_neighbour"] = (j != batch["index"].to(q.device, non_blocking=True)).float().mean()
            logs["loss_ins"], logs["loss_mix"] = l_ins.detach(), l_mix.detach()
        loss = total_loss(l_ins, l_mix, [nce(qs, k, negatives, t) for qs in q_scales])
        self.queue.enqueue(k)                                             # anchor keys only: baseline turnover
        return loss, logs


# ================================================================ defaults
# SGD momentum 0.9, lr per 256 images, per-step cosine to 0, no warm-up; bn_splits 8: split-BN stands in for
# 8 GPUs on one device (MoCo's demo). K: queue length; clusters: M; resolutions: S. select_start = 10 % of epochs.

SMALL = dict(arch="resnet18", stem="auto", epochs=500, batch_size=512, lr=0.03, wd=5e-4, optimizer="sgd",
             warmup_epochs=0, bn_splits=8, queue_size=4096, clusters=100, resolutions=[24, 16])
LARGE = dict(SMALL, arch="resnet50", stem="imagenet", epochs=200, batch_size=256, wd=1e-4, queue_size=65536,
             clusters=10000, resolutions=[160, 128, 96])
DEFAULTS = {
    # [base method] MoCo-v2 at 32 px (lr 0.03/256, wd 5e-4); M, S [our choice]
    "cifar10": SMALL,
    "cifar100": SMALL,                           # [our choice] the cifar10 row
    "stl10": dict(SMALL, resolutions=[64, 48]),  # [our choice] 96 px, train+unlabeled
    "tinyimagenet": dict(SMALL, resolutions=[48, 32]),         # [our choice] 64 px
    "imagenet100": dict(LARGE, queue_size=16384, clusters=1000),  # [our choice] K and M scaled to 126k images
    # [base method] MoCo-v2 ImageNet recipe; M 10000 as CSML's clustering.py
    "imagenet": LARGE,
    "folder": dict(LARGE, clusters="auto", resolutions="auto"),  # imagenet row; M = N/100 (10..10000), S x S0/224
    "synthetic": SMALL,                          # the cifar10 row
}


def parse(argv=None):
    p = common.base_parser(__doc__)
    a = p.add_argument
    a("--queue-size", type=int, default=None, help="MoCo queue length K (65536 ImageNet, 16384 IN-100, 4096 small "
      "datasets); a multiple of --batch-size")
    a("--temperature", type=float, default=0.2, help="InfoNCE temperature tau (MoCo-v2: 0.2)")
    a("--ema", type=float, default=0.999, help="momentum m of the key encoder f_k (MoCo: 0.999)")
    a("--clusters", type=int, default=None, help="k-means clusters M (ImageNet 10000, IN-100 1000, small datasets 100; "
      "about N/100)")
    a("--knn", type=int, default=10, help="neighbours k searched per anchor (10; sweep 5-50)")
    a("--select-every", type=int, default=5, help="epochs between selection passes R (5; sweep 1-10)")
    a("--select-start", type=int, default=None, help="0-based epoch of the first pass E_w (default 10%% of --epochs); "
      "before it anchors mix with themselves")
    a("--kmeans-iters", type=int, default=20, help="spherical k-means Lloyd iterations per pass (20)")
    a("--select", default="center", choices=["center", "cluster", "knn", "none"],
      help="candidate rule: center = same cluster and closer to its centre (CLIM); cluster = same cluster; "
           "knn = all k neighbours; none = self-mix only")
    a("--mix", default="cutmix", choices=["cutmix", "mixup", "none"],
      help="how the neighbour enters: cutmix (CLIM), mixup, or none (the neighbour view is a hard positive)")
    a("--mix-alpha", type=float, default=1.0, help="Beta(alpha, alpha) of the mixing ratio lambda0 (1.0)")
    a("--resolutions", nargs="+", default=None, help="sizes (px) of the extra low-resolution anchor queries, or none "
      "(CIFAR 24 16, STL-10 64 48, Tiny 48 32, ImageNet 160 128 96; --baseline: none unless given)")
    argv = sys.argv[1:] if argv is None else argv
    raw = p.parse_known_args(argv)[0]
    args = common.parse(p, DEFAULTS, "clim", argv)
    args.framework = "mocov2"  # --baseline: MoCo-v2 (CLIM's base), no selection, no mixing
    if raw.baseline and raw.resolutions is None:
        args.resolutions = []
    elif args.resolutions != "auto":
        r = [str(x).lower() for x in args.resolutions]
        if r == ["none"]:
            args.resolutions = []
        elif not all(x.isdigit() and int(x) > 0 for x in r):
            common.fail(f"--resolutions {' '.join(r)}: give positive sizes in pixels (e.g. 24 16) or none")
        else:
            args.resolutions = [int(x) for x in r]
    if args.select_start is None:
        args.select_start = round(0.1 * args.epochs)
    for name in ("knn", "select_every"):
        if getattr(args, name) < 1:
            common.fail(f"--{name.replace('_', '-')} must be at least 1 (recommended: knn 10, select-every 5)")
    if args.mix_alpha <= 0 or args.kmeans_iters < 0 or args.select_start < 0:
        common.fail("--mix-alpha must be > 0 (1.0), --kmeans-iters >= 0 (20), --select-start >= 0")
    return args


def build(args, data):
    size, n = common.view_size(args, data), len(data.train)
    res = [round(s * size / 224) for s in LARGE["resolutions"]] if args.resolutions == "auto" else args.resolutions
    clusters = min(10000, max(10, n // 100)) if args.clusters == "auto" else args.clusters
    if args.queue_size % args.batch_size:
        raise common.UserError(f"--queue-size {args.queue_size} must be a multiple of --batch-size {args.batch_size}")
    if not args.baseline and args.select != "none" and not (1 <= clusters <= n and args.knn < n):
        raise common.UserError(f"--clusters {clusters} and --knn {args.knn} must not exceed the {n} training images; "
                               f"use about N/100 clusters (e.g. --clusters {max(1, n // 100)})")
    names = view_names(args.baseline, args.mix, res)
    sizes = [size] * (len(names) - len(res)) + list(res)
    recipes = [common.mocov2_recipe(blur=common.blurs("clim", size))] * len(names)  # MoCo-v2 aug+
    model = CLIM(common.build_backbone(args.arch, args.stem), names, args.queue_size, args.temperature, args.ema,
                 args.mix)
    common.print0(f"{args.method}: views {' '.join(f'{n}@{s}' for n, s in zip(names, sizes))}; K {args.queue_size}, "
                  f"tau {args.temperature}, m {args.ema}" + ("" if args.baseline else
                  f"; selection {args.select} (M {clusters}, k {args.knn}) at epoch {args.select_start} then every "
                  f"{args.select_every}; mix {args.mix} (alpha {args.mix_alpha})"))
    if args.baseline:
        return common.Setup(model, common.Views(CLIMViews(names), sizes, recipes))
    sel = NeighbourSelection(args, data, model, size, clusters)
    mix = None if args.mix == "none" else functools.partial(mix_params, size, args.mix_alpha)
    return common.Setup(model, common.Views(CLIMViews(names), sizes, recipes, sel.sources, mix), sel)


# ================================================================ figures

def _img(data, i):
    return np.asarray(data.train.pil(i)) / 255.0


def draw_selection(path, data, res, epoch, seed, n=6):
    """selection_eXXXX.png: anchors (cluster, s_i), their candidates (cosine, s_j; grey = -1),
    the most central image."""
    table, assign, central, z, centres = (res[k] for k in ("table", "assign", "central", "z", "centres"))
    table = table.cpu()                                                          # z stays on the device (N x 128)
    has = (table[:, 0] >= 0).nonzero().flatten().tolist()
    pool = has if len(has) >= n else list(range(len(table)))
    rows = []
    for i in random.Random(seed + epoch).sample(pool, min(n, len(pool))):
        a = int(assign[i])
        row = [{"img": _img(data, i), "title": f"anchor {i}\ncluster {a}, s={central[i]:.2f}"}]
        row += [{"img": _img(data, j), "title": f"cos {z[i] @ z[j]:.2f}\ns={central[j]:.2f}"} if j >= 0 else
                {"img": np.full((8, 8, 3), 0.5), "title": "-1"} for j in table[i].tolist()]
        c = int((z @ centres[a]).argmax())
        rows.append(row + [{"img": _img(data, c), "title": f"nearest centre {a}\n(image {c})"}])
    common.save_figure_grid(rows, path, f"selection at epoch {epoch}: "
                            f"{100 * (table[:, 0] < 0).float().mean():.1f}% of anchors have no candidate")


def draw_views(path, args, data, setup, epoch, n=4):
    """views.png: anchor and neighbour sources with their boxes, x_q, x_n, x_mix (pasted box, lambda), each x_s."""
    names, sizes = setup.model.names, setup.views.sizes
    ds = common.ViewDataset(data.train, setup.views, args.seed)
    ds.epoch.fill_(epoch)
    table = setup.state.table
    has = (table[:, 0] >= 0).nonzero().flatten().tolist()
    idx = random.Random(args.seed).sample(has if len(has) >= n else range(len(ds)), min(n, len(ds)))
    batch = torch.utils.data.default_collate([ds[i] for i in idx])
    views = common.device_views(batch, data.train.images if data.train.in_memory else None, data.mean, data.std,
                                sizes, torch.device("cpu"))
    v = dict(zip(names, views))
    show = lambda x: common.denormalize(x, data.mean, data.std)
    box = lambda r, name, colour: (*batch["boxes"][r, names.index(name)].tolist(), colour, name)
    if args.mix != "none":
        x_mix, lam, pasted = mix_views(args.mix, v["x_q"], v["x_n"], batch["mix_lam0"], batch["mix_centre"])
    rows = []
    for r, i in enumerate(idx):
        j = int(batch["src"][r, names.index("x_n")])
        row = [{"img": _img(data, i), "title": f"anchor {i}", "boxes": [box(r, "x_q", "lime"), box(r, "x_k", "red")]},
               {"img": _img(data, j), "title": "self" if j == i else f"neighbour {j}",
                "boxes": [box(r, m, c) for m, c in (("x_n", "orange"), ("x_n2", "deepskyblue")) if m in names]},
               {"img": show(v["x_q"][r]), "title": "x_q"}, {"img": show(v["x_n"][r]), "title": "x_n"}]
        if args.mix != "none":
            y1, x1, y2, x2 = pasted[r].tolist() if pasted is not None else (0, 0, 0, 0)
            bx = [(y1, x1, y2 - y1, x2 - x1, "white", "")] if y2 > y1 else []
            row.append({"img": show(x_mix[r]), "title": f"x_mix ({args.mix}) λ={lam[r]:.2f}", "boxes": bx})
        rows.append(row + [{"img": show(v[m][r]), "title": f"{m} ({s} px)"} for m, s in zip(names, sizes)
                           if m.startswith("x_s")])
    common.save_figure_grid(rows, path, f"CLIM views at epoch {epoch} (select {args.select}, mix {args.mix})")


def show_views(args, data, setup, path):
    """Figures without training: the checkpoint in --out (if any) supplies f_k and the epoch; one selection pass
    with that f_k fills the table (collective: every rank runs it) and is drawn. Nothing is saved."""
    if args.baseline:
        if common.is_main():
            common.show_views(args, data, setup.views, path,
                              title="clim --baseline (MoCo-v2): x_q, x_k"
                              + (" + MR queries" if args.resolutions else ""))
        return {}
    out, epoch, ckpt = {}, 0, os.path.join(args.out, "checkpoint.pth")
    if os.path.exists(ckpt):
        ck = common.load_checkpoint(ckpt, args, args.method, len(data.train) // args.batch_size)
        common.restore(ck, model=setup.model)
        epoch = ck["step"] // ck["steps_per_epoch"]
    setup.model.to(args.device)
    if args.select != "none":
        setup.state.select(epoch)
        out["selection"] = os.path.join(args.out, f"selection_e{epoch:04d}.png")
    if common.is_main():
        draw_views(path, args, data, setup, epoch)
    return out


# ================================================================ main

def main(argv=None):
    common.main(parse, build, show_views, None, argv)  # the official code normalises with the ImageNet constants


if __name__ == "__main__":
    main()
