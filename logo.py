"""logo.py: LoGo, "Leverage Your Local and Global Representations: A New Self-Supervised Learning Strategy"
(Zhang, Qiu, Tang, Chen, Zhang, Shan, Ji; CVPR 2022; arXiv 2203.17205; official code ztt1024/LoGo-SSL).

Idea. Each image gives two large *global* and two small *local* crops. The global crops attract each other with the
base framework's loss (SimSiam or MoCo-v2) and each local crop is attracted to both global crops, its stop-gradient or
momentum targets. Two local crops of one image often show different things, so LoGo pushes them apart instead, scored
by a learned affinity network T (an MLP) rather than a cosine. T learns to tell same-image local pairs from pairs of
different images; the encoder learns to make same-image pairs look like different-image ones: a min-max game (Eq. 9,
Alg. 1) with a tiny weight (1e-4) on the encoder's side.

Paper -> code:
  Eq. 1 (MoCo-v2 InfoNCE) / Eq. 2 (SimSiam)   common.info_nce / common.neg_cosine, the pair loss l(a, b)
  Eq. 3 + Eq. 4 (global-global, local-global)  main_loss                (6 terms averaged, official trainers.py)
  Eq. 5-6 (affinity objective, logistic form)  affinity_batch, affinity_loss, derangement, AffinityTrainer.step
  Eq. 9 (L = L_main + lambda L_ll, min-max)     repulsion_loss, LoGo.forward
  Alg. 1 (affinity step first, then encoder)   LoGo.forward; MoCo EMA + enqueue in LoGo.after_step
  Fig. 2 (2 global + 2 local crops)            LoGoViews, SIZES

Commands:
  python logo.py --dataset synthetic --subset 256 --batch-size 32 --epochs 1 --stem imagenet --gpus 0  # CPU smoke
  python logo.py --dataset cifar10 --data DIR --download                 # 1 GPU: SimSiam-LoGo, R-18, 200 epochs
  python logo.py --dataset imagenet --data DIR --gpus 8                  # 8 GPUs: MoCo-v2-LoGo, R-50
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
      logo.py --dataset imagenet --data DIR
  python logo.py --dataset cifar10 --data DIR --baseline                 # arms: --baseline, --ll-weight 0,
                                                                         # --affinity cos
  python logo.py --dataset cifar10 --data DIR --show-views               # views.png (+ affinity_hist.png
                                                                         # after training)
"""
import math, os, random, sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ================================================================ losses (fp32)

def main_loss(pair, online, targets):
    """Eq. 3 symmetrised + Eq. 4, averaged over 6 terms (code trainers.py); never an l(g, l) term:
    L_main = (1/6)[l(g1,g2) + l(g2,g1) + sum_ij l(l_i,g_j)]. pair(a, b): base loss of online output a (B x D) against
    target b (B x D, stop-gradient or momentum key); online: [g1, g2, l1, l2] (or [g1, g2]); targets: [g1, g2]."""
    gg = [pair(online[0], targets[1]), pair(online[1], targets[0])]
    lg = [pair(o, t) for o in online[2:] for t in targets]
    return (sum(gg) + sum(lg)) / 6, gg, lg


def derangement(n, device=None):
    """Uniform random permutation of 0..n-1 with no fixed point (rejection sampling, ~e draws of the torch CPU
    generator, so it is restored with the RNG on resume). The code's batch reversal fixes the middle row at odd n."""
    if n < 2:
        raise common.UserError("LoGo's deranged negatives need at least 2 images per process; raise --batch-size")
    while True:
        perm = torch.randperm(n)
        if not bool((perm == torch.arange(n)).any()):
            break
    cuda = device is not None and torch.device(device).type == "cuda"  # pinned + asynchronous copy: no host sync
    return perm.pin_memory().to(device, non_blocking=True) if cuda else perm.to(device or "cpu")


def affinity_batch(a, b, perm):
    """Inputs of Eq. 6. a, b: B x D unit local embeddings (l1, l2 of the same images); perm: a derangement.
    Positives [a|b], [b|a] (label 1) then negatives [a|b_perm], [b|a_perm] (label 0): 4B x 2D rows, 4B labels."""
    pos = torch.cat([torch.cat([a, b], 1), torch.cat([b, a], 1)])
    neg = torch.cat([torch.cat([a, b[perm]], 1), torch.cat([b, a[perm]], 1)])
    labels = torch.cat([torch.ones(len(pos), device=a.device), torch.zeros(len(neg), device=a.device)])
    return torch.cat([pos, neg]), labels


def affinity_loss(logits, labels):
    """Eq. 6 in the code's logistic form: BCE over the 4B rows = 1/2 mean_P sp(-T) + 1/2 mean_N sp(T)."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def repulsion_loss(logits):
    """L_ll of Eq. 9 (logistic form): mean_B sp(T(l1, l2)); its gradient sigma(T) > 0 makes the encoder lower T on
    same-image local pairs. (sp(-T) here would attract them instead.)"""
    return F.softplus(logits.float()).mean()


# ================================================================ affinity network T

class AffinityTrainer(common.State):
    """T (code Regressor_softplus): [z_a | z_b] (2D) -> 256 -> BN-ReLU -> 256 -> BN-ReLU -> 1 logit, with its own SGD
    (constant lr). Deliberately not a submodule of the model: fit never optimises it or converts its BN; its state
    (weights, BN buffers, momentum) travels as the Setup's state. Under DDP it has its own wrapper, so all ranks train
    the same T. Always fp32 (autocast off): it is tiny and stays outside the encoder's loss scaling."""

    def __init__(self, dim, hidden=256, lr=0.03, momentum=0.9, wd=1e-4, noise=0.0, device="cpu"):
        device = torch.device(device)
        self.net = common.mlp([2 * dim, hidden, hidden, 1]).to(device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
        self.trained = self.net if common.get_world() == 1 else nn.parallel.DistributedDataParallel(
            self.net, device_ids=[device.index] if device.type == "cuda" else None)
        self.dim, self.noise = dim, noise

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])

    def step(self, a, b):
        """Alg. 1, affinity first: one SGD step of Eq. 6 on detached unit rows a, b (B x D). Returns detached logs."""
        x, y = affinity_batch(a.detach().float(), b.detach().float(), derangement(len(a), a.device))
        n = len(x) // 2
        if self.noise > 0:  # the code's positive-row noise N(0, (noise/sqrt(D))^2) on both halves (ablation only)
            x = torch.cat([x[:n] + torch.randn_like(x[:n]) * (self.noise / math.sqrt(self.dim)), x[n:]])
        with torch.autocast(a.device.type, enabled=False):
            self.net.train()
            logits = self.trained(x).squeeze(1)  # P and N in one forward: BN never sees a single class
            loss = affinity_loss(logits, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        t = logits.detach()
        return {"aff_loss": loss.detach(), "aff_acc": ((t > 0).float() == y).float().mean(),
                "t_pos": t[:n].mean(), "t_neg": t[n:].mean()}

    def score(self, pairs):
        """T as a fixed function (Eq. 9): eval-mode BN (running stats, not updated), no gradient to T's weights;
        the gradient still reaches the pairs (N x 2D)."""
        self.net.eval().requires_grad_(False)
        with torch.autocast(pairs.device.type, enabled=False):
            t = self.net(pairs.float()).squeeze(1)
        self.net.train().requires_grad_(True)
        return t


# ================================================================ views

# (global px, local px): code loader.py; STL/Tiny ours
SIZES = {"cifar10": (32, 32), "cifar100": (32, 32), "synthetic": (32, 32), "stl10": (96, 48),
         "tinyimagenet": (64, 32), "imagenet100": (224, 96), "imagenet": (224, 96)}


class LoGoViews:
    """[g1, g2, l1, l2]: RandomResizedCrop boxes (ratio 3/4-4/3), flip p 0.5; globals cover global_scale (0.4-1)
    of the image, locals local_scale (0.05-0.4) (official main_logo.py). A class, so spawned workers can pickle it."""

    def __init__(self, global_scale, local_scale):
        self.scales = [tuple(global_scale)] * 2 + [tuple(local_scale)] * 2

    def __call__(self, index, hw, rng):
        (H, W), = hw
        return [common.Crop(*common.rrc_box(H, W, s, rng=rng), rng.random() < 0.5) for s in self.scales]


# ================================================================ model

class LoGo(common.Model):
    """LoGo around a common.py base framework `base` (common.SimSiam, or common.MoCoV2 with symmetric=True), whose
    encoder, predictor, key encoder and queue it uses. forward([g1, g2, l1, l2]) -> (L_main + ll_weight L_ll, logs);
    with baseline=True: views [g1, g2] and the base framework's own two-view loss, bit for bit."""

    def __init__(self, base, framework, ll_weight=1e-4, affinity=None, baseline=False):
        super().__init__()
        self.base, self.framework, self.ll_weight, self.baseline = base, framework, ll_weight, baseline
        # AffinityTrainer (a plain object, so not a submodule), or None (cos / lambda 0 / baseline)
        self.affinity = affinity
        self.sync_bn = framework == "simsiam"  # MoCo uses shuffle-BN instead
        self._keys = None

    @property
    def backbone(self):
        return self.base.backbone

    def embed(self, x):
        """Online projector output z of one crop; each crop is its own forward, so BN never mixes crops."""
        return self.base.encoder(x) if self.framework == "simsiam" else self.base.encoder_q(x)

    def forward(self, views, batch=None):
        z = [self.embed(v) for v in views]
        if self.framework == "simsiam":
            online, targets, pair = [self.base.predictor(x) for x in z], z[:2], common.neg_cosine  # Eq. 2, sg inside
        else:
            with torch.no_grad():
                # common.MoCoV2's order (the shuffle's RNG): k2 first
                k2, k1 = (common.shuffled_forward(self.base.encoder_k, v) for v in (views[1], views[0]))
            self._keys = (k1, k2)
            queue = self.base.queue.queue  # before this step's enqueue: that runs in after_step, after backward
            online, targets = z, [k1, k2]
            pair = lambda q, k: common.info_nce(q, k, queue, self.base.temperature)  # Eq. 1, logits B x (1+K)
        loss, gg, lg = main_loss(pair, online, targets)
        # the base loss as common.py computes it: SimSiam averages the two directions, symmetric MoCo-v2 sums them
        l_gg = 0.5 * (gg[0] + gg[1]) if self.framework == "simsiam" else gg[0] + gg[1]
        if self.baseline:
            return l_gg, {"l_gg": l_gg.detach()}
        a, b = (F.normalize(e.float(), dim=1) for e in z[2:])
        logs = {"l_gg": l_gg.detach(), "l_lg": (sum(lg) / 4).detach(), "local_cos": (a * b).sum(1).mean().detach()}
        if self.ll_weight > 0:
            if self.affinity is None:  # --affinity cos: the naive repulsion that T replaces
                l_ll = (a * b).sum(1).mean()
            else:
                logs.update(self.affinity.step(a, b))  # Alg. 1: T first, on detached inputs
                l_ll = repulsion_loss(self.affinity.score(torch.cat([a, b], 1)))
            loss = loss + self.ll_weight * l_ll  # Eq. 9; one optimizer for the encoder
            logs["l_ll"] = l_ll.detach()
        return loss, logs

    @torch.no_grad()
    def after_step(self):
        """MoCo, once per iteration: EMA of the key encoder, then enqueue every rank's g1 keys, then g2 keys
        (2 x global batch; one gather per crop keeps the queue order of a 1-process run)."""
        if self.framework == "mocov2" and self._keys is not None:
            common.ema_update(self.base.encoder_k, self.base.encoder_q, self.base.momentum)
            for k in self._keys:
                self.base.queue.enqueue(k)
            self._keys = None


# ================================================================ defaults, build, run

_SMALL = dict(framework="simsiam", arch="resnet18", stem="cifar", epochs=200, batch_size=512, lr=0.015, wd=1e-4,
              optimizer="sgd", warmup_epochs=0, bn_splits=1, moco_k=4096)
_LARGE = dict(framework="mocov2", arch="resnet50", stem="imagenet", epochs=200, batch_size=256, lr=0.03, wd=1e-4,
              optimizer="sgd", warmup_epochs=0, bn_splits=8, moco_k=65536)
DEFAULTS = {
    "cifar10": _SMALL,                               # [paper]* R-18, 200 ep, 512, 0.03@512, wd 1e-4; K 4096 [code]
    "cifar100": _SMALL,                              # [our choice] the CIFAR-10 recipe
    "stl10": {**_SMALL, "stem": "imagenet"},         # [our choice] CIFAR-10 recipe, ImageNet stem at 96 px
    "tinyimagenet": _SMALL,                          # [our choice] CIFAR-10 recipe, CIFAR stem at 64 px
    "imagenet100": {**_LARGE, "arch": "resnet34"},   # [our choice] R-34 as the code's backbone.py/eval_knn.py
    "imagenet": _LARGE,                              # [official code] main_logo.py; cosine [base method]
    "synthetic": _SMALL,                             # tests and demos: the cifar10 row
    "folder": {**_LARGE, "arch": "resnet34", "stem": "auto"},  # the imagenet100 row; stem by image side
}

# Normalisation: [official code] loader.py (load_datasets, load_eval_datasets) normalises CIFAR-10 with CIFAR_COMMON
# and ImageNet-100 with the ImageNet constants (load_data's default); it has no other dataset.
NORM_STATS = {"cifar10": common.CIFAR_COMMON}


def parse(argv=None):
    p = common.base_parser(__doc__)
    a = p.add_argument
    a("--framework", default=None, choices=["simsiam", "mocov2"],
      help="base framework: simsiam (small datasets, the paper's CIFAR-10 number) or mocov2 (ImageNet, official code)")
    a("--ll-weight", type=float, default=1e-4,
      help="lambda of the local-local repulsion L_ll (Eq. 9): 1e-4; 0 = multi-crop arm")
    a("--global-size", type=int, default=None,
      help="global crop side in px (32 CIFAR, 64 Tiny, 96 STL-10, 224 ImageNet)")
    a("--local-size", type=int, default=None, help="local crop side in px (32 CIFAR/Tiny, 48 STL-10, 96 ImageNet)")
    a("--global-scale", type=float, nargs=2, default=[0.4, 1.0], metavar=("MIN", "MAX"),
      help="global crop area fraction: 0.4 1")
    a("--local-scale", type=float, nargs=2, default=[0.05, 0.4], metavar=("MIN", "MAX"),
      help="local crop area fraction: 0.05 0.4")
    a("--aff-hidden", type=int, default=256, help="hidden width of the affinity MLP T: 256")
    a("--aff-lr", type=float, default=0.03, help="SGD lr of T per 256 images, constant (no schedule): 0.03")
    a("--aff-momentum", type=float, default=0.9, help="SGD momentum of T: 0.9")
    a("--aff-wd", type=float, default=1e-4, help="weight decay of T: 1e-4")
    a("--aff-noise", type=float, default=0.0,
      help="ablation: noise std x sqrt(D) on T's positive rows (the code: 0.3); 0 = none")
    a("--affinity", default="mlp", choices=["mlp", "cos"],
      help="mlp: learned affinity T (LoGo); cos: L_ll = mean cosine (ablation)")
    a("--moco-t", type=float, default=0.2, help="MoCo-v2 temperature: 0.2")
    a("--moco-k", "--queue-size", dest="moco_k", type=int, default=None,
      help="MoCo queue length K: 65536 ImageNet, 4096 small; >= 2 x batch")
    a("--moco-m", type=float, default=0.999, help="MoCo key-encoder EMA momentum: 0.999")
    a("--moco-dim", type=int, default=128, help="MoCo embedding width D_z: 128")
    argv = sys.argv[1:] if argv is None else argv
    pre = p.parse_known_args(argv)[0]
    fw = pre.framework or DEFAULTS.get(pre.dataset, _SMALL)["framework"]  # another framework: its BN policy, same row
    defaults = {d: {**row, "framework": fw, "bn_splits": 8 if fw == "mocov2" else 1} for d, row in DEFAULTS.items()}
    args = common.parse(p, defaults, "logo", argv)
    for name, (lo, hi) in (("global", args.global_scale), ("local", args.local_scale)):
        if not 0 < lo <= hi <= 1:
            common.fail(f"--{name}-scale {lo} {hi} must satisfy 0 < MIN <= MAX <= 1")
    if args.ll_weight < 0:
        common.fail(f"--ll-weight {args.ll_weight} must be >= 0 (the encoder side of the min-max game; 1e-4)")
    if args.framework == "mocov2" and args.moco_k < 2 * args.batch_size:
        common.fail(f"--moco-k {args.moco_k} must hold the 2 x {args.batch_size} keys of one step; raise it")
    return args


def view_plan(args, like):
    """Resolve the crop sizes (paper Sec. 4.1 and the code's loader.py; a folder: those of the dataset it resembles,
    common.folder_like) -> Views."""
    g, l = SIZES[like]
    args.global_size, args.local_size = args.global_size or g, args.local_size or l
    G, L = args.global_size, args.local_size
    if args.baseline:  # the base framework's two views: scale (0.2, 1) at the global size
        crops, sizes = common.two_views((0.2, 1.0)), [G, G]
    else:
        crops, sizes = LoGoViews(args.global_scale, args.local_scale), [G, G, L, L]
    # MoCo-v2 recipe, all views
    return common.Views(crops, sizes, [common.mocov2_recipe(common.blurs("logo", s)) for s in sizes])


def build(args, data):
    views = view_plan(args, common.folder_like(data.train) if args.dataset == "folder" else args.dataset)
    if args.batch_size // common.get_world() < 2:
        raise common.UserError(f"--batch-size {args.batch_size} leaves < 2 images per process; "
                               "LoGo needs 2 for negatives")
    backbone = common.build_backbone(args.arch, args.stem, zero_init_residual=args.framework == "simsiam")
    d = backbone.out_dim
    if args.framework == "simsiam":  # projector d-2048-2048 (+2048 on ImageNet) with BN; predictor 2048-512-2048
        proj = [d, 2048, 2048, 2048] if args.global_size >= 160 else [d, 2048, 2048]
        base, dim = common.SimSiam(backbone, proj, 512), 2048
    else:  # MoCo-v2 projector d-d-128 without BN (code backbone.py), both directions (Eq. 3)
        base = common.MoCoV2(backbone, [d, d, args.moco_dim], args.moco_k, args.moco_t, args.moco_m, symmetric=True)
        dim = args.moco_dim
    affinity = None
    if not args.baseline and args.ll_weight > 0 and args.affinity == "mlp":
        aff_lr = args.aff_lr * args.batch_size / 256
        affinity = AffinityTrainer(dim, args.aff_hidden, aff_lr, args.aff_momentum, args.aff_wd, args.aff_noise,
                                   args.device)
        common.print0(f"affinity net T: {2 * dim}-{args.aff_hidden}-{args.aff_hidden}-1, constant lr {aff_lr:.4g} "
                      f"(= {args.aff_lr} x {args.batch_size}/256), lambda {args.ll_weight}")
    model = LoGo(base, args.framework, args.ll_weight, affinity, args.baseline)
    return common.Setup(model, views, affinity)


def plot_views(args, data, setup, path):
    """views.png: per image the source with g1/g2 (green) and l1/l2 (orange) boxes and area fractions,
    then the views."""
    ds = common.ViewDataset(data.train, setup.views, args.seed)
    idx = random.Random(args.seed).sample(range(len(ds)), min(4, len(ds)))
    batch = torch.utils.data.default_collate([ds[i] for i in idx])
    images = data.train.images if data.train.in_memory else None
    views = common.device_views(batch, images, data.mean, data.std, setup.views.sizes, torch.device("cpu"))
    names, rows = ["g1", "g2", "l1", "l2"], []
    for r, i in enumerate(idx):
        src = np.asarray(data.train.pil(i)) / 255.0
        area = src.shape[0] * src.shape[1]
        boxes = [(t, l, h, w, "lime" if k < 2 else "orange", f"{names[k]} {h * w / area:.2f}")
                 for k, (t, l, h, w) in enumerate(batch["boxes"][r].tolist())]
        rows.append([{"img": src, "title": f"image {i}", "boxes": boxes}] + [
            {"img": common.denormalize(views[k][r], data.mean, data.std), "title": f"{names[k]} {s}px"}
            for k, s in enumerate(setup.views.sizes)])
    common.save_figure_grid(rows, path, "LoGo views: global crops (green), local crops (orange), area fractions")


@torch.no_grad()
def plot_affinity(args, data, setup, ckpt, path, batches=8):
    """affinity_hist.png: eval-mode T logits of same-image local pairs vs deranged pairs, from a checkpoint."""
    ck = common.load_checkpoint(ckpt, args, args.method, len(data.train) // args.batch_size)
    model, affinity, device = setup.model.to(args.device), setup.state, args.device
    common.restore(ck, model=model, state=affinity)
    ds = common.ViewDataset(data.train, setup.views, args.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=min(args.batch_size, 256), shuffle=True, drop_last=True,
                                         num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
    images = data.train.images.to(device) if data.train.in_memory else None
    logits, labels = [], []
    for _, batch in zip(range(batches), loader):  # local crops only; encoder in training mode, as T saw them
        local = {k: batch[k][:, 2:] for k in ("src", "boxes", "flips", "photo")}
        local.update({f"view{k - 2}": batch[f"view{k}"] for k in (2, 3) if f"view{k}" in batch})
        a, b = (F.normalize(model.embed(v).float(), dim=1)
                for v in common.device_views(local, images, data.mean, data.std, setup.views.sizes[2:], device))
        x, y = affinity_batch(a, b, derangement(len(a), device))
        logits.append(affinity.score(x).cpu())
        labels.append(y.cpu() > 0)
    t, y = torch.cat(logits), torch.cat(labels)
    acc = 100 * ((t > 0) == y).float().mean().item()

    def draw(ax):
        for sel, label in ((y, "same image (positive)"), (~y, "deranged (negative)")):
            ax.hist(t[sel].numpy(), bins=40, alpha=0.6, label=label)
        ax.axvline(0, color="k", lw=1)
        ax.set(xlabel="T logit (eval mode)", ylabel="pairs")
        ax.legend(fontsize=7)
    title = f"step {ck['step']}: accuracy {acc:.1f}%, mean T_pos {t[y].mean():.3f}, mean T_neg {t[~y].mean():.3f}"
    common.save_figure_grid([[{"draw": draw, "title": title}]], path, tile=4.0)
    return acc


def show(args, data, setup, path):
    """--show-views: views.png; with a checkpoint in --out also affinity_hist.png (T on same-image vs other pairs)."""
    out = {}
    if common.is_main():
        plot_views(args, data, setup, path)
        ckpt = os.path.join(args.out, "checkpoint.pth")
        if os.path.exists(ckpt) and setup.state is not None:
            out["affinity_hist"] = os.path.join(args.out, "affinity_hist.png")
            out["affinity_acc"] = plot_affinity(args, data, setup, ckpt, out["affinity_hist"])
    return out


def main(argv=None):
    common.main(parse, build, show, NORM_STATS, argv)  # NORM_STATS: the official code's loader.py


if __name__ == "__main__":
    main()
