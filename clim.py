"""CLIM: Center-wise Local Image Mixture for Contrastive Representation Learning.
Li, Zhang, Xiong, BMVC 2021, arXiv 2011.02697. Base method: MoCo-v2 (arXiv 2003.04297).
Authors' code: github.com/lihao0374/Cluster_Mix_MR (a MoCo-v2 fork). This file follows it; where it departs, the
README's fidelity table says why ([our choice]).

Idea. MoCo-v2 treats every other image as a negative. CLIM also takes positives from other images. Every 10 epochs
(from epoch 0) it embeds the training set with the query encoder (pooled backbone features of a centre crop),
PCA-whitens them to 128 dims, L2-normalises them and clusters them with k-means. An image is an eligible positive
if it lies at most the cluster's mean distance from its centroid ("center-wise"). Each anchor draws one eligible
member of its own cluster. In 80 % of the batches one CutMix box of the positive's query is pasted into the
anchor's query; the mixed query must then match the anchor's key with weight lambda (its pixel share) and the
positive's key with weight 1 - lambda. Queries and keys come at two resolutions (224 and 160 px on ImageNet),
each with its own queue, and all four query/key pairings are averaged.

Paper / authors' code -> this file:
  the loss over the four pairings, lambda-weighted        -> clim_loss
  one CutMix box per batch, scaled to each resolution     -> cutmix_box, mix_queries
  clustering: features -> PCA-whitening -> L2 k-means      -> cluster_features, pca_whiten, kmeans
  eligibility (distance <= the cluster's mean)             -> eligible
  the positive: uniform over the eligible members          -> positive_tables, PositiveSampler

Commands:
  python clim.py --dataset synthetic --subset 512 --batch-size 64 --epochs 2 --stem imagenet --gpus 0  # CPU smoke
  python clim.py --dataset cifar10 --data ./data --download                        # 1 GPU, 500 epochs
  python clim.py --dataset imagenet --data /path/to/imagenet --gpus 8 --workers 10 # 8 GPUs, ResNet-50, 200 epochs
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 clim.py --dataset imagenet --data DIR --workers 10
  python clim.py --dataset cifar10 --data ./data --baseline                        # MoCo-v2, one resolution
  python clim.py --dataset cifar10 --data ./data --ablation mr                     # two resolutions, no positives
  python clim.py --dataset cifar10 --data ./data --show-views                      # clusters, positives, mixed queries
"""
import functools, os, random, sys, time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

BLOCK = 2 ** 26  # most entries of one distance block in k-means (256 MiB in fp32)


# ================================================================ the loss (fp32)

@common.fp32
def clim_loss(queries, keys, pos_keys, lam, queues, temperature):
    """L = 1/R^2 sum over the pairings (q_r, k_s) of lam l(q_r, k_s) + (1 - lam) l(q_r, k~_s), where l is MoCo's
    InfoNCE with the negatives of the queue of the key's resolution s (authors' main_moco.py and moco/builder.py).
    queries, keys, pos_keys, queues: one per resolution (B x D unit rows; K x D); lam: the batch's scalar.
    With lam = 1 (a batch without mixing) it is multi-resolution MoCo-v2."""
    total = 0.0
    for q in queries:
        for k, k_pos, queue in zip(keys, pos_keys, queues):
            total = total + lam * common.info_nce(q, k, queue, temperature) \
                + (1 - lam) * common.info_nce(q, k_pos, queue, temperature)
    return total / (len(queries) * len(keys))


# ================================================================ the mixture: one CutMix box per batch

def mix_draw(alpha, index, rng):
    """Per-sample draws that travel with the batch; the batch uses the first sample's of the global batch (one draw
    per batch as in the authors' loop, the same for any number of processes; carried by the data, so a resumed run
    draws the same)."""
    return {"mix_u": torch.tensor(rng.random()), "mix_lam0": torch.tensor(rng.betavariate(alpha, alpha)),
            "mix_centre": torch.tensor([rng.random(), rng.random()])}


def cutmix_box(size, lam0, centre):
    """The authors' rand_bbox at side `size`: cut = floor(size sqrt(1 - lam0)), centre (y, x) = floor(centre size),
    corners centre -+ cut // 2 clipped to the image. -> (y1, x1, y2, x2) as tensors (no host sync)."""
    cut = torch.floor(size * torch.sqrt(1 - lam0.float()))
    c = torch.floor(centre.float() * size)
    lo, hi = (c - (cut // 2)).clamp(0, size), (c + (cut // 2)).clamp(0, size)
    return lo[0], lo[1], hi[0], hi[1]


def mix_queries(queries, pos_queries, batch, mix="cutmix", prob=0.8):
    """With probability `prob` (once per batch) the positive's query is mixed into the anchor's query at every
    resolution: CutMix pastes one box, scaled to each resolution, and lam = 1 - box area / S0^2 at the first
    resolution (the anchor's pixel share); Mixup blends with lam = lam0. Otherwise lam = 1 and the queries stay.
    -> (mixed queries, lam, on) with lam and on 0-d tensors."""
    d = torch.cat([batch["mix_u"][:1].float(), batch["mix_lam0"][:1].float(), batch["mix_centre"][0].float()])
    if common.is_dist():
        dist.broadcast(d, 0)                                   # rank 0 holds the global batch's first sample
    u, lam0, centre = d[0], d[1], d[2:]
    on = u < prob
    if mix == "mixup":
        lam = torch.where(on, lam0, torch.ones_like(lam0))
        return [lam * q + (1 - lam) * p for q, p in zip(queries, pos_queries)], lam, on
    out = []
    for q, p in zip(queries, pos_queries):
        S = q.shape[-1]
        y1, x1, y2, x2 = cutmix_box(S, lam0, centre)
        r = torch.arange(S, device=q.device)
        box = ((r >= y1) & (r < y2))[:, None] & ((r >= x1) & (r < x2))[None, :]          # S x S
        out.append(torch.where(box & on, p, q))
        if len(out) == 1:
            lam = torch.where(on, 1 - (y2 - y1) * (x2 - x1) / S ** 2, torch.ones_like(lam0))
    return out, lam, on


# ================================================================ clustering (every 10 epochs from epoch 0)

def _all_sum(t):
    if common.is_dist():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def pca_whiten(x, dim=128, eps=1e-4):
    """faiss's PCAMatrix(D, dim, eigen_power=-0.5) and then L2 row normalisation (the authors' preprocess_features):
    y = normalize(V^T (x - mean) / sqrt(eigenvalue)) over the top `dim` principal directions. x: this rank's rows;
    the mean and covariance are summed over ranks, so all ranks apply one projection and no rank gathers the
    features. A direction whose eigenvalue is below eps x the largest (no variance beyond rounding: fewer images
    than dims, fp16 storage) is dropped rather than blown up to unit variance. -> len(x) x dim fp32."""
    n = _all_sum(torch.tensor(float(len(x)), dtype=torch.float64, device=x.device))
    mean = _all_sum(sum(c.double().sum(0) for c in x.split(65536))) / n
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for c in x.split(65536):
        c = (c.double() - mean).float()
        cov += (c.T @ c).double()
    cov = _all_sum(cov) / n
    evals, evecs = torch.linalg.eigh(cov.cpu())                          # ascending; the same on every rank
    evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
    keep = evals > eps * evals[0]
    proj = torch.where(keep, evecs / evals.clamp(min=1e-300).sqrt(), 0).float().to(x.device)  # D x dim
    return torch.cat([F.normalize((c.float() - mean.float()) @ proj, dim=1) for c in x.split(65536)])


def _global_rows(x, idx, n):
    """Rows idx (global indices) of the whole set whose rows are sharded over ranks: each rank fills its own."""
    rows = common.shard_rows(n)
    out = torch.zeros(len(idx), x.shape[1], device=x.device)
    mine = (idx >= rows.start) & (idx < rows.stop)
    out[mine] = x[idx[mine] - rows.start].float()
    return _all_sum(out)


def _nearest(x, centres):
    """Squared L2 distance to the nearest centre and its index, in blocks."""
    rows = max(1, BLOCK // len(centres))
    c2 = (centres * centres).sum(1)
    d2, a = [], []
    for c in x.split(rows):
        d = ((c * c).sum(1, keepdim=True) - 2 * c @ centres.T + c2).clamp(min=0)
        m = d.min(1)
        d2.append(m.values)
        a.append(m.indices)
    return torch.cat(d2), torch.cat(a)


@torch.no_grad()
def kmeans(x, k, iters, seed, n):
    """Lloyd's k-means with squared L2 distances (the authors use faiss's L2 k-means, 30 iterations). x: this
    rank's rows of the n rows; cluster sums are summed over ranks, so every rank holds the same centres. Init: k
    distinct random rows (seeded); an empty cluster takes a random row. Sums are one-hot matmuls in fixed blocks
    (no atomics: deterministic). -> centres k x D, and for x: assignments (long) and squared distances."""
    g = torch.Generator().manual_seed(seed)
    centres = _global_rows(x, torch.randperm(n, generator=g)[:k].to(x.device), n)
    ones = torch.ones(len(x), 1, device=x.device)
    for _ in range(iters):
        _, a = _nearest(x, centres)
        sums = torch.zeros(k, x.shape[1] + 1, device=x.device)
        rows = max(1, BLOCK // k)
        for s in range(0, len(x), rows):
            onehot = F.one_hot(a[s:s + rows], k).float()
            sums += onehot.T @ torch.cat([x[s:s + rows], ones[s:s + rows]], 1)     # k x (D + 1): sums, counts
        sums = _all_sum(sums)
        centres = sums[:, :-1] / sums[:, -1:].clamp(min=1)
        empty = (sums[:, -1] == 0).nonzero().flatten()
        if len(empty):
            centres[empty] = _global_rows(x, torch.randint(n, (len(empty),), generator=g).to(x.device), n)
    d2, a = _nearest(x, centres)
    return centres, a, d2


def eligible(assign, d2, k):
    """The authors' pos_flag: a member is an eligible positive if its squared distance to the centroid is at most
    its cluster's mean (faiss reports squared L2 distances)."""
    count = torch.bincount(assign, minlength=k).double()
    mean = torch.bincount(assign, weights=d2.double(), minlength=k) / count.clamp(min=1)
    return d2.double() <= mean[assign]


def positive_tables(assign, ok, k):
    """The eligible images sorted by (cluster, index), and offsets: cluster c's eligible members are
    members[offsets[c]:offsets[c + 1]]. Sorting by index makes the draw independent of file order."""
    n = len(assign)
    idx = ok.nonzero().flatten()
    order = torch.argsort(assign[idx] * n + idx)
    members = torch.full((n,), -1, dtype=torch.int32)
    members[:len(idx)] = idx[order].int()
    offsets = torch.zeros(k + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(torch.bincount(assign[idx], minlength=k), 0).int()
    return members, offsets


class PositiveSampler:
    """Views.sources in the DataLoader workers: [i, j] with j uniform over the eligible members of i's cluster
    (possibly i itself, as the authors' sampler); [i] before the first clustering. The tables live in shared memory
    and are updated in place, so persistent workers see each re-clustering. The authors draw j within +-50 places
    of i in a list sorted by cluster and then by dataset index: on a class-sorted ImageFolder those are files next
    to i, mostly of i's class (a label leak). This draw does not depend on the files' order."""

    def __init__(self, cluster_of, members, offsets):
        self.cluster_of, self.members, self.offsets = cluster_of, members, offsets

    def __call__(self, index, rng):
        c = int(self.cluster_of[index])
        if c < 0:
            return [index]
        lo, hi = int(self.offsets[c]), int(self.offsets[c + 1])
        j = int(self.members[lo + rng.randrange(hi - lo)])
        return [index] if j == index else [index, j]


@torch.no_grad()
def cluster_features(model, data, size, args, k, epoch):
    """One clustering pass: the query encoder's pooled backbone features of CenterCrop(S0) views (eval mode, BN
    statistics averaged over ranks), each rank its shard (fp16 storage: host memory never exceeds the features) ->
    PCA-whitening to 128 dims -> k-means. -> centres, and for all n images: assignments, squared distances."""
    n = len(data.train)
    feats = common.extract_features(model.encoder_q.backbone, data.train, size, data.mean, data.std, args.device,
                                    workers=args.workers, shard=True, dtype=torch.float16, view="centre")
    y = pca_whiten(feats, args.pca_dim)
    del feats
    centres, a, d2 = kmeans(y, k, args.kmeans_iters, args.seed * 1000 + epoch, n)
    assign, dist2 = torch.empty(n, dtype=torch.long, device=y.device), torch.empty(n, device=y.device)
    rows = common.shard_rows(n)
    assign.zero_()[rows] = a
    dist2.zero_()[rows] = d2
    return centres.cpu(), _all_sum(assign).cpu(), _all_sum(dist2).cpu()


def schedule(epoch, start, every):
    """Re-cluster at epoch start, start + every, ... (0-based; the authors: every 10 epochs from epoch 0)."""
    return epoch >= start and (epoch - start) % every == 0


class Clusters(common.State):
    """The clustering outside the DDP module (never buffers: DDP would broadcast them each step): shared int32
    tables the workers read (cluster of each image, eligible members by cluster, offsets), and for figures and
    the checkpoint the centres and squared distances. Saved with the epoch of the last pass."""

    def __init__(self, args, data, model, size, k):
        n = len(data.train)
        self.cluster_of = torch.full((n,), -1, dtype=torch.int32).share_memory_()   # before the loader exists
        self.members = torch.full((n,), -1, dtype=torch.int32).share_memory_()
        self.offsets = torch.zeros(k + 1, dtype=torch.int32).share_memory_()
        self.centres, self.d2 = torch.zeros(k, min(args.pca_dim, model.backbone.out_dim)), torch.zeros(n)
        self.last_epoch, self.stats = -1, {}
        self.args, self.data, self.model, self.size, self.k = args, data, model, size, k
        self.sampler = PositiveSampler(self.cluster_of, self.members, self.offsets)

    def before_epoch(self, epoch):
        if schedule(epoch, self.args.cluster_start, self.args.cluster_every) and self.last_epoch != epoch:
            self.recluster(epoch)

    def recluster(self, epoch):
        t0 = time.time()
        centres, assign, d2 = cluster_features(self.model, self.data, self.size, self.args, self.k, epoch)
        ok = eligible(assign, d2, self.k) if self.args.eligible == "mean" else torch.ones(len(assign), dtype=torch.bool)
        members, offsets = positive_tables(assign, ok, self.k)
        self.cluster_of.copy_(assign)                                   # in place: the workers see it
        self.members.copy_(members)
        self.offsets.copy_(offsets)
        self.centres.copy_(centres)
        self.d2.copy_(d2)
        self.last_epoch, self.stats = epoch, self.summary(assign, ok, time.time() - t0)
        s = self.stats
        common.print0(f"clustering at epoch {epoch}: {s['clusters_used']} of {self.k} clusters used, "
                      f"{100 * s['eligible']:.1f}% of images eligible as positives"
                      + (f", positive shares the anchor's class {100 * s['label_agreement']:.1f}%"
                         if "label_agreement" in s else "") + f" ({s['time_s']:.1f} s)")

    def summary(self, assign, ok, seconds):
        """Logged per pass: clusters used, eligible share, and (labels, logging only) the expected chance that the
        drawn positive has the anchor's class."""
        stats = {"clusters_used": int((torch.bincount(assign, minlength=self.k) > 0).sum()),
                 "eligible": ok.float().mean().item(), "time_s": round(seconds, 2)}
        if self.data.train.has_labels:
            y = torch.as_tensor(self.data.train.labels)
            key = assign * (int(y.max()) + 1) + y
            same = torch.bincount(key[ok], minlength=self.k * (int(y.max()) + 1)).double()[key]
            eligible_in_cluster = torch.bincount(assign[ok], minlength=self.k).double()[assign]
            stats["label_agreement"] = (same / eligible_in_cluster).mean().item()
        return stats

    def state_dict(self):
        return {"cluster_of": self.cluster_of.clone(), "members": self.members.clone(),
                "offsets": self.offsets.clone(), "centres": self.centres.clone(), "d2": self.d2.clone(),
                "last_epoch": self.last_epoch, "stats": dict(self.stats)}

    def load_state_dict(self, sd):
        if sd["offsets"].shape != self.offsets.shape or sd["centres"].shape != self.centres.shape:
            raise common.UserError(f"the checkpoint has {len(sd['offsets']) - 1} clusters of dimension "
                                   f"{sd['centres'].shape[1]}, this run {self.k} of {self.centres.shape[1]}; "
                                   "use the same --clusters/--pca-dim or another --out")
        for name in ("cluster_of", "members", "offsets", "centres", "d2"):
            getattr(self, name).copy_(sd[name])                         # in place: never rebound
        self.last_epoch, self.stats = sd["last_epoch"], dict(sd["stats"])

    def epoch_logs(self):
        return {"cluster_epoch": self.last_epoch, **{f"cluster_{k}": v for k, v in self.stats.items()}}


# ================================================================ model

def view_names(resolutions, positives=True):
    """The anchor's query q{s} and key k{s} at each resolution; the positive's query pq{s} (pasted) and key pk{s}."""
    names = [f"q{s}" for s in resolutions] + [f"k{s}" for s in resolutions]
    return names + ([f"p{n}" for n in names] if positives else [])


class CLIMCrops:
    """MoCo-v2's RandomResizedCrop (scale 0.2-1) and flip for every view; the positive's views crop the last source
    (the anchor itself when the sampler returned [i]). A class, so spawned workers can pickle it."""

    def __init__(self, names, scale=(0.2, 1.0)):
        self.names, self.scale = list(names), tuple(scale)

    def __call__(self, index, hw, rng):
        srcs = [len(hw) - 1 if n.startswith("p") else 0 for n in self.names]
        return [common.Crop(*common.rrc_box(*hw[s], self.scale, rng=rng), rng.random() < 0.5, s) for s in srcs]


class CLIM(common.MoCoV2):
    """MoCo-v2 (f_q; f_k = EMA(f_q) with shuffle-BN keys) with one queue of anchor keys per resolution.
    positives=False is the authors' multi-resolution MoCo-v2 (--ablation mr)."""

    def __init__(self, backbone, resolutions, queue_size, temperature, momentum, positives=True, mix="cutmix",
                 mix_prob=0.8):
        d = backbone.out_dim
        super().__init__(backbone, [d, d, 128], queue_size, temperature, momentum)  # head d-d-128 [base method]
        del self.queue
        self.queues = nn.ModuleList(common.Queue(queue_size, 128) for _ in resolutions)
        self.resolutions, self.positives, self.mix, self.mix_prob = list(resolutions), positives, mix, mix_prob
        self.names = view_names(resolutions, positives)

    def forward(self, views, batch):
        v, R = dict(zip(self.names, views)), self.resolutions
        common.ema_update(self.encoder_k, self.encoder_q, self.momentum)   # where common's MoCo-v2 does it
        negatives = [Q.queue.clone() for Q in self.queues]                 # every logit: the pre-enqueue queues
        x_q, logs = [v[f"q{s}"] for s in R], {}
        if self.positives:
            x_q, lam, on = mix_queries(x_q, [v[f"pq{s}"] for s in R], batch, self.mix, self.mix_prob)
            logs = {"lambda": lam.detach(), "mixed": on.float()}
        else:
            lam = torch.ones((), device=x_q[0].device)
        q = [self.encoder_q(x) for x in x_q]                                 # one pass per resolution
        k = [common.shuffled_forward(self.encoder_k, v[f"k{s}"]) for s in R]  # no grad, shuffle-BN
        k_pos = [common.shuffled_forward(self.encoder_k, v[f"pk{s}"]) for s in R] if self.positives else k
        loss = clim_loss(q, k, k_pos, lam, negatives, self.temperature)
        for Q, key in zip(self.queues, k):                                   # only the anchor's keys
            Q.enqueue(key)
        return loss, logs


# ================================================================ defaults
# MoCo-v2 [base method]: SGD momentum 0.9, lr 0.03 per 256, per-step cosine to 0, no warm-up; split-BN 8 stands in
# for 8 GPUs on one device (MoCo's CIFAR demo). K: queue length. Clusters and resolutions are "auto" everywhere:
# K_clusters = round(N / 1280), at least 10; resolutions S0 and round(S0 160 / 224).

SMALL = dict(arch="resnet18", stem="auto", epochs=500, batch_size=512, lr=0.03, wd=5e-4, optimizer="sgd",
             warmup_epochs=0, bn_splits=8, queue_size=4096)
LARGE = dict(SMALL, arch="resnet50", stem="imagenet", epochs=200, batch_size=256, wd=1e-4, queue_size=65536)
DEFAULTS = {"cifar10": SMALL, "cifar100": SMALL, "stl10": SMALL, "tinyimagenet": SMALL, "synthetic": SMALL,
            "imagenet100": dict(LARGE, queue_size=16384),  # the authors' script: K 66560 on their subset
            "imagenet": LARGE, "folder": LARGE}


def parse(argv=None):
    p = common.base_parser(__doc__)
    a = p.add_argument
    a("--queue-size", type=int, default=None, help="MoCo queue length K per resolution (65536 ImageNet, 16384 "
      "IN-100, 4096 small datasets); a multiple of --batch-size")
    a("--temperature", type=float, default=0.2, help="InfoNCE temperature tau (MoCo-v2: 0.2)")
    a("--ema", type=float, default=0.999, help="momentum m of the key encoder f_k (MoCo: 0.999)")
    a("--clusters", type=int, default=None, help="k-means clusters (default round(N / 1280), at least 10: "
      "1000 on ImageNet, 100 on ImageNet-100)")
    a("--cluster-every", type=int, default=10, help="epochs between clustering passes (10)")
    a("--cluster-start", type=int, default=0, help="0-based epoch of the first pass (0: the random network, as "
      "the authors); before it every anchor is its own positive")
    a("--kmeans-iters", type=int, default=30, help="Lloyd iterations per pass (30)")
    a("--pca-dim", type=int, default=128, help="PCA-whitening dimension before k-means (128)")
    a("--eligible", default="mean", choices=["mean", "all"], help="which cluster members may be positives: mean = "
      "at most the cluster's mean distance from its centroid (CLIM); all = any member (ablation)")
    a("--mix", default="cutmix", choices=["cutmix", "mixup"], help="how the positive enters the query (cutmix)")
    a("--mix-prob", type=float, default=0.8, help="probability that a batch is mixed (0.8)")
    a("--mix-alpha", type=float, default=1.0, help="lambda0 ~ Beta(alpha, alpha) (1.0, the released script)")
    a("--resolutions", nargs="+", type=int, default=None, help="query and key sizes in px, the first is the main "
      "one (default S0 and round(S0 160 / 224): 224 160 on ImageNet, 32 23 on CIFAR)")
    a("--ablation", default="none", choices=["none", "mr"], help="mr: the authors' multi-resolution MoCo-v2 "
      "without positives (the gain of the positives = CLIM - mr)")
    argv = sys.argv[1:] if argv is None else argv
    raw = p.parse_known_args(argv)[0]
    if raw.baseline and raw.ablation != "none":
        common.fail("--baseline and --ablation are two different arms: pass one of them")
    args = common.parse(p, DEFAULTS, "clim-mr" if raw.ablation == "mr" else "clim", argv)  # its own runs/ folder
    args.framework = "mocov2"  # --baseline: MoCo-v2 at one resolution (CLIM's base)
    return args


def resolutions(args, size):
    return args.resolutions or [size, round(size * 160 / 224)]


def n_clusters(args, n):
    return args.clusters or min(n, max(10, round(n / 1280)))


def build(args, data):
    size, n = common.view_size(args, data), len(data.train)
    if args.queue_size % args.batch_size:
        raise common.UserError(f"--queue-size {args.queue_size} must be a multiple of --batch-size {args.batch_size}")
    backbone = common.build_backbone(args.arch, args.stem)
    if args.baseline:
        model = common.MoCoV2(backbone, [backbone.out_dim, backbone.out_dim, 128], args.queue_size,
                              args.temperature, args.ema)
        common.print0(f"{args.method}: MoCo-v2, views 2 x {size} px; K {args.queue_size}, tau {args.temperature}, "
                      f"m {args.ema}")
        return common.Setup(model, common.Views(common.two_views((0.2, 1.0)), [size] * 2,
                                                [common.mocov2_recipe(common.blurs("clim", size))] * 2))
    res, k, positives = resolutions(args, size), n_clusters(args, n), args.ablation != "mr"
    if positives and not 1 <= k <= n:
        raise common.UserError(f"--clusters {k} must be between 1 and the {n} training images "
                               f"(default round(N / 1280), at least 10)")
    if positives and n < 10 * args.pca_dim:
        common.print0(f"note: {n} images for --pca-dim {args.pca_dim}: whitened, N points in fewer than N dims are "
                      "nearly equidistant and k-means splits them by rounding noise; use --pca-dim at most N / 10")
    model = CLIM(backbone, res, args.queue_size, args.temperature, args.ema, positives, args.mix, args.mix_prob)
    sizes = res * (4 if positives else 2)                                  # view_names' order
    recipes = [common.mocov2_recipe(common.blurs("clim", s)) for s in sizes]  # MoCo-v2 aug+
    common.print0(f"{args.method}: views {' '.join(f'{v}' for v in model.names)} (px); K {args.queue_size} per "
                  f"resolution, tau {args.temperature}, m {args.ema}" + (f"; {k} clusters every {args.cluster_every} "
                  f"epochs from epoch {args.cluster_start}, positives: {args.eligible}; {args.mix} with p "
                  f"{args.mix_prob}, alpha {args.mix_alpha}" if positives else "; no positives (--ablation mr)"))
    views = common.Views(CLIMCrops(model.names), sizes, recipes)
    if not positives:
        return common.Setup(model, views)
    clusters = Clusters(args, data, model, size, k)
    views = views._replace(sources=clusters.sampler, extra=functools.partial(mix_draw, args.mix_alpha))
    return common.Setup(model, views, clusters)


# ================================================================ figures

def _img(data, i):
    return np.asarray(data.train.pil(i)) / 255.0


def draw_views(path, args, data, setup, epoch, n=4, central=3):
    """views.png, one anchor per row: the anchor (its cluster), the cluster's centre-most members, the drawn
    positive, and the mixed query at each resolution (the pasted box outlined, lambda). A mixed batch is shown."""
    model, cl = setup.model, setup.state
    ds = common.ViewDataset(data.train, setup.views, args.seed)
    ds.epoch.fill_(epoch)
    idx = random.Random(args.seed).sample(range(len(ds)), min(n, len(ds)))
    batch = torch.utils.data.default_collate([ds[i] for i in idx])
    batch["mix_u"][0] = 0.0                                                   # show the mixed case
    views = common.device_views(batch, data.train.images if data.train.in_memory else None, data.mean, data.std,
                                setup.views.sizes, torch.device("cpu"))
    v = dict(zip(model.names, views))
    R = model.resolutions
    mixed, lam, _ = mix_queries([v[f"q{s}"] for s in R], [v[f"pq{s}"] for s in R], batch, args.mix, 1.0)
    show = lambda x: common.denormalize(x, data.mean, data.std)
    rows = []
    for r, i in enumerate(idx):
        c = int(cl.cluster_of[i])
        row = [{"img": _img(data, i), "title": f"anchor {i}\ncluster {c}"}]
        if c >= 0:
            mem = (cl.cluster_of == c).nonzero().flatten()
            for m in mem[cl.d2[mem].argsort()[:central]].tolist():
                row.append({"img": _img(data, m), "title": f"centre-most {m}\nd2 {cl.d2[m]:.2f}"})
        j = int(batch["src"][r, model.names.index(f"pq{R[0]}")])
        row.append({"img": _img(data, j), "title": "positive = self" if j == i else f"positive {j}"})
        for s, x in zip(R, mixed):
            y1, x1, y2, x2 = (int(t) for t in cutmix_box(s, batch["mix_lam0"][0], batch["mix_centre"][0]))
            box = [(y1, x1, y2 - y1, x2 - x1, "white", "")] if args.mix == "cutmix" and y2 > y1 and x2 > x1 else []
            row.append({"img": show(x[r]), "title": f"mixed q {s} px\nλ={float(lam):.2f}", "boxes": box})
        rows.append(row)
    common.save_figure_grid(rows, path, f"CLIM at epoch {epoch}: anchors, centre-most members of their cluster, "
                            f"the positive, the mixed queries ({args.mix})")


def show_views(args, data, setup, path):
    """Figures without training: the checkpoint in --out (if any) supplies the network and the epoch; one
    clustering pass with it (collective: every rank runs it) fills the tables that are drawn. Nothing is saved."""
    if setup.state is None:
        if common.is_main():
            common.show_views(args, data, setup.views, path, title=f"{args.method}: " + " ".join(setup.model.names
                              if hasattr(setup.model, "names") else ["x1", "x2"]))
        return {}
    epoch, ckpt = 0, os.path.join(args.out, "checkpoint.pth")
    if os.path.exists(ckpt):
        ck = common.load_checkpoint(ckpt, args, args.method, len(data.train) // args.batch_size)
        common.restore(ck, model=setup.model)
        epoch = ck["step"] // ck["steps_per_epoch"]
    setup.model.to(args.device)
    setup.state.recluster(epoch)
    if common.is_main():
        draw_views(path, args, data, setup, epoch)
    return {}


# ================================================================ main

def main(argv=None):
    common.main(parse, build, show_views, None, argv)  # the authors normalise with the ImageNet constants


if __name__ == "__main__":
    main()
