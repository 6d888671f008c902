"""LeOCLR: Leveraging Original Images for Contrastive Learning of Visual Representations.
Alkhalefi, Leontidis, Zhong, TMLR 2024, arXiv:2403.06813. The authors published no code; the base framework
is MoCo-v2 (facebookresearch/moco), built here from common.py's pieces.

Idea. Two random crops of one image may show different things (a dog's head, a patch of grass); pulling them
together teaches the encoder to match unrelated content. LeOCLR anchors on the whole, uncropped image instead:
the query encoder embeds the original x, the momentum encoder embeds two random crops x1 and x2, and each crop
is pulled toward the original and pushed away from a queue of negatives. Every crop lies inside the original,
so every positive pair shares content; the crops are never compared with each other. Everything else (EMA key
encoder, queue, MLP head, temperature, SGD recipe) is MoCo-v2.

Paper -> code
  Eq. 1   InfoNCE of one query-key pair against the queue   common.info_nce (fp32)
  Eq. 2   L = l(q(x), k(x1)) + l(q(x), k(x2))               leoclr_loss
  Alg. 1  original -> E_q, two crops -> E_k, EMA, queue     LeOCLRViews, LeOCLR.forward
  --baseline: symmetric MoCo-v2 on the two crops            common.MoCoV2(symmetric=True)

Commands
  # CPU smoke
  python leoclr.py --dataset synthetic --subset 512 --epochs 2 --batch-size 64 --queue-size 512 --stem imagenet --gpus 0
  python leoclr.py --dataset cifar10 --data DIR --download                  # 1 GPU: MoCo's CIFAR demo recipe,
                                                                             # 800 epochs
  python leoclr.py --dataset imagenet --data DIR --gpus 8                   # 8 GPUs, 32 images each
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 leoclr.py --dataset imagenet --data DIR
  python leoclr.py --dataset cifar10 --data DIR --baseline                  # symmetric MoCo-v2, everything else equal
  python leoclr.py --dataset cifar10 --data DIR --anchor crop               # ablations: --anchor center|crop,
                                                                             # --orig-aug flip|none, --enqueue first,
                                                                             # --crop-scale 0.2 1
  python leoclr.py --dataset cifar10 --data DIR --show-views                # views.png, no training
  python linear_eval.py runs/leoclr-cifar10 runs/leoclr-baseline-cifar10 --dataset cifar10 --data DIR
"""
import random, sys

import numpy as np
import torch

import common

# ================================================================ loss (fp32)


def leoclr_loss(q, k1, k2, negatives, temperature):
    """Eq. 2: L = l(q, k1; N) + l(q, k2; N). q: B x D queries of the originals; k1, k2: B x D keys of the two
    crops (no gradient); negatives: K x D, the queue at step start, shared by both terms.
    A sum, not a mean (a mean would halve the effective lr), and no k1-k2 term. Returns (L, term1, term2)."""
    term1 = common.info_nce(q, k1, negatives, temperature)
    term2 = common.info_nce(q, k2, negatives, temperature)
    return term1 + term2, term1, term2


# ================================================================ views


def anchor_box(H, W, anchor, scale, rng):
    """The query's box. full: the whole image (squashed to S x S later; nothing cut, no padding);
    center: the largest centred square (A2); crop: a third independent RandomResizedCrop (A1)."""
    if anchor == "full":
        return 0, 0, H, W  # explicit box: RandomResizedCrop(scale=(1, 1)) would centre-crop wide images
    if anchor == "center":
        s = min(H, W)
        return (H - s) // 2, (W - s) // 2, s, s
    return common.rrc_box(H, W, scale, rng=rng)


class LeOCLRViews:
    """views_fn: [x, x1, x2] (LeOCLR) or [x1, x2] (--baseline). x1, x2: independent RandomResizedCrops with
    flip p=0.5. The draws are the same in both arms, so for a given (seed, epoch, index) the baseline sees
    exactly LeOCLR's two crops. A class, so spawned workers can pickle it."""

    def __init__(self, scale=(0.08, 1.0), anchor="full", orig_aug="full", baseline=False):
        self.scale, self.anchor, self.orig_aug, self.baseline = tuple(scale), anchor, orig_aug, baseline

    def __call__(self, index, hw, rng):
        (H, W), = hw
        box = anchor_box(H, W, self.anchor, self.scale, rng)
        flip = rng.random() < 0.5 and self.orig_aug != "none"  # always drawn: the crops stay the same across A3 arms
        x = common.Crop(*box, flip)
        x1 = common.Crop(*common.rrc_box(H, W, self.scale, rng=rng), rng.random() < 0.5)
        x2 = common.Crop(*common.rrc_box(H, W, self.scale, rng=rng), rng.random() < 0.5)
        return [x1, x2] if self.baseline else [x, x1, x2]


def leoclr_recipes(size, orig_aug="full", baseline=False):
    """MoCo-v2 aug+ for every view (blur only at ImageNet sizes); --orig-aug flip|none: no colour on x (A3)."""
    crop = common.mocov2_recipe(blur=common.blurs("leoclr", size))
    original = crop if orig_aug == "full" else common.Recipe(p_jitter=0.0, p_gray=0.0)
    return [crop, crop] if baseline else [original, crop, crop]


# ================================================================ model


class LeOCLR(common.MoCoV2):
    """E_q = g_q o f_q (trained by SGD) embeds the original x; E_k = EMA(E_q) embeds the crops x1, x2, one
    shuffle-BN pass each; a queue of K keys holds the negatives. common.MoCoV2 supplies E_q, E_k (both give
    unit rows) and the queue; only forward differs."""

    def __init__(self, backbone, proj_dim=128, queue_size=4096, temperature=0.1, momentum=0.99, enqueue="both"):
        d = backbone.out_dim
        super().__init__(backbone, [d, d, proj_dim], queue_size, temperature, momentum)  # head Linear-ReLU-Linear
        self.enqueue = enqueue

    def forward(self, views, batch=None):
        x, x1, x2 = views
        q = self.encoder_q(x)  # the only pass with gradient: the whole image
        common.ema_update(self.encoder_k, self.encoder_q, self.momentum)  # once per step, theta_q before the SGD step
        k1, k2 = (common.shuffled_forward(self.encoder_k, v) for v in (x1, x2))  # no grad; E_k stays in train mode
        negatives = self.queue.queue.clone()  # one snapshot for both terms: this step's keys are never negatives
        loss, t1, t2 = leoclr_loss(q, k1, k2, negatives, self.temperature)
        self.queue.enqueue(k1)  # k1 of every rank, then k2: the same queue layout for any number of processes
        if self.enqueue == "both":
            self.queue.enqueue(k2)
        return loss, {"loss_x_x1": t1.detach(), "loss_x_x2": t2.detach()}


def check_queue(queue_size, batch_size, enqueue):
    """The queue must hold a whole number of steps' keys (2 x global batch, or 1 x with --enqueue first)."""
    per_step = batch_size * (2 if enqueue == "both" else 1)
    if queue_size < per_step or queue_size % per_step:
        fix = max(per_step, round(queue_size / per_step) * per_step)
        raise common.UserError(f"--queue-size {queue_size} must be a multiple of the {per_step} keys enqueued per step "
                               f"({'2 x ' if enqueue == 'both' else ''}--batch-size {batch_size}); "
                               f"pass e.g. --queue-size {fix}")


# ================================================================ defaults
# lr is per 256 images (effective lr = lr x batch / 256); SGD momentum 0.9, cosine to 0 per step, no warm-up;
# weight decay on all parameters; bn_splits 8 = the demo's split-BN stand-in for 8 GPUs on one device.

SMALL = dict(arch="resnet18", stem="cifar", epochs=800, batch_size=512, lr=0.03, wd=5e-4, optimizer="sgd",
             warmup_epochs=0, bn_splits=8, temperature=0.1, ema=0.99, queue_size=4096)
LARGE = dict(arch="resnet50", stem="imagenet", epochs=800, batch_size=256, lr=0.03, wd=1e-4, optimizer="sgd",
             warmup_epochs=0, bn_splits=8, temperature=0.2, ema=0.999, queue_size=65536)
DEFAULTS = {
    # [base method] MoCo CIFAR-10 demo: R18 CIFAR stem, 0.06 @ 512, wd 5e-4, t 0.1, m 0.99, K 4096
    "cifar10": SMALL,
    "cifar100": SMALL,       # [our choice] the demo recipe, native 32 px
    "stl10": SMALL,          # [our choice] the demo recipe at native 96 px, pre-trained on the 100k unlabeled split
    "tinyimagenet": SMALL,   # [our choice] the demo recipe at native 64 px
    "imagenet100": dict(LARGE, epochs=200, queue_size=16384),  # [our choice] ImageNet recipe, K scaled to the data
    "imagenet": LARGE,       # [base method] MoCo-v2 README / main_moco.py; 800 epochs (its longest published run)
    "folder": LARGE,         # the imagenet row (small-image folders: pass the cifar10 settings)
    "synthetic": SMALL,      # the cifar10 row
}

# Normalisation: [base method] the MoCo demo (colab/moco_cifar10_demo.ipynb) normalises CIFAR-10 with CIFAR_COMMON;
# MoCo's main_moco.py ImageNet with the ImageNet constants (load_data's default). LeOCLR has no public code.
NORM_STATS = {"cifar10": common.CIFAR_COMMON}


def parse(argv=None):
    p = common.base_parser(__doc__)
    a = p.add_argument
    a("--crop-scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"),
      help="area fraction range of the crops x1, x2 (0.08 1.0, torchvision's default as in Alg. 1; A5: 0.2 1.0)")
    a("--anchor", default="full", choices=["full", "center", "crop"],
      help="the query view: full = whole image squashed to S (LeOCLR); center = largest centred square (A2); "
           "crop = a third random crop (A1)")
    a("--orig-aug", default="full", choices=["full", "flip", "none"],
      help="augmentation of the query view: full = flip + MoCo-v2 colour (LeOCLR); flip = flip only; none (A3)")
    a("--enqueue", default="both", choices=["both", "first"],
      help="keys enqueued per step: both = k1 and k2 (2 x batch, recommended); first = k1 only (A4)")
    a("--proj-dim", type=int, default=128, help="output width of the projection head and the queue (128)")
    a("--temperature", type=float, default=None, help="InfoNCE temperature (0.2 at 224 px, 0.1 on small datasets)")
    a("--ema", type=float, default=None, help="momentum m of the key encoder (0.999 at 224 px, 0.99 on small datasets)")
    a("--queue-size", type=int, default=None,
      help="queue length K (65536 ImageNet, 4096 small datasets); a multiple of the keys per step (2 x batch)")
    argv = sys.argv[1:] if argv is None else argv
    args = common.parse(p, DEFAULTS, "leoclr", argv)
    args.framework = "mocov2"  # --baseline: common.MoCoV2, symmetric
    lo, hi = args.crop_scale
    if not 0 < lo <= hi <= 1:
        common.fail(f"--crop-scale {lo} {hi} must satisfy 0 < MIN <= MAX <= 1; LeOCLR uses 0.08 1.0")
    if args.baseline and (args.anchor != "full" or args.orig_aug != "full" or args.enqueue != "both"):
        common.fail("--anchor, --orig-aug and --enqueue shape LeOCLR's query view and queue, which --baseline does not "
                    "have (it is symmetric MoCo-v2); drop them")
    if args.proj_dim < 1:
        common.fail(f"--proj-dim {args.proj_dim} must be positive; LeOCLR uses 128")
    return args


def build(args, data):
    check_queue(args.queue_size, args.batch_size, args.enqueue)
    size = common.view_size(args, data)
    backbone = common.build_backbone(args.arch, args.stem)
    if args.baseline:  # the demo's symmetric MoCo-v2 with LeOCLR's head (Linear-ReLU-Linear)
        d = backbone.out_dim
        model = common.MoCoV2(backbone, [d, d, args.proj_dim], args.queue_size, args.temperature, args.ema,
                              symmetric=True)
    else:
        model = LeOCLR(backbone, args.proj_dim, args.queue_size, args.temperature, args.ema, args.enqueue)
    scale = tuple(args.crop_scale)
    per_step = args.batch_size * (2 if args.enqueue == "both" else 1)
    query = ("x1<->x2 (symmetric MoCo-v2)" if args.baseline
             else f"query x = {args.anchor} image (orig-aug {args.orig_aug})")
    common.print0(f"{args.method}: {query}, keys x1, x2 = crops of area {scale[0]:g}-{scale[1]:g} at {size} px; "
                  f"queue K {args.queue_size} = {args.queue_size // per_step} steps of keys, "
                  f"tau {args.temperature}, m {args.ema}")
    return common.Setup(model, common.Views(LeOCLRViews(scale, args.anchor, args.orig_aug, args.baseline),
                                            [size] * (2 if args.baseline else 3),
                                            leoclr_recipes(size, args.orig_aug, args.baseline)))


# ================================================================ --show-views


def box_iou(a, b):
    (t1, l1, h1, w1), (t2, l2, h2, w2) = a, b
    ih = max(0.0, min(t1 + h1, t2 + h2) - max(t1, t2))
    iw = max(0.0, min(l1 + w1, l2 + w2) - max(l1, l2))
    return ih * iw / (h1 * w1 + h2 * w2 - ih * iw)


def show_views(args, data, setup, path, n=4):
    """views.png: per image the source with its boxes, then each view after crop+resize+flip, then after colour."""
    if not common.is_main():
        return
    ds = common.ViewDataset(data.train, setup.views, args.seed)
    idx = random.Random(args.seed).sample(range(len(ds)), min(n, len(ds)))
    items = [ds[i] for i in idx]
    batch = torch.utils.data.default_collate(items)
    images = data.train.images if data.train.in_memory else None
    cpu = torch.device("cpu")
    coloured = common.device_views(batch, images, data.mean, data.std, setup.views.sizes, cpu)
    plain = common.device_views({**batch, "photo": torch.zeros_like(batch["photo"])}, images, data.mean, data.std,
                                setup.views.sizes, cpu)  # all-zero photometric parameters: geometry only
    names = ["x1", "x2"] if args.baseline else ["x", "x1", "x2"]
    colours = {"x": "white", "x1": "red", "x2": "blue"}
    rows = []
    for r, (i, item) in enumerate(zip(idx, items)):
        src = np.asarray(data.train.pil(i)) / 255.0
        H, W = src.shape[:2]
        boxes = dict(zip(names, item["boxes"].tolist()))
        caption = ("\n".join(f"{k}: area {b[2] * b[3] / (H * W):.2f}, aspect {b[3] / b[2]:.2f}"
                             for k, b in boxes.items() if k != "x")
                   + f"\nIoU(x1, x2) {box_iou(boxes['x1'], boxes['x2']):.2f}")
        rows.append([{"img": src, "title": caption, "boxes": [(*b, colours[k], k) for k, b in boxes.items()]}]
                    + [{"img": common.denormalize(v[r], data.mean, data.std), "title": f"{k}: crop+resize+flip"}
                       for k, v in zip(names, plain)]
                    + [{"img": common.denormalize(v[r], data.mean, data.std), "title": f"{k}: + colour"}
                       for k, v in zip(names, coloured)])
    if args.baseline:
        title = "--baseline (symmetric MoCo-v2): q(x1)<->k(x2), q(x2)<->k(x1)"
    else:
        title = "query x->E_q; keys x1, x2->E_k; positives (x,x1), (x,x2); no (x1,x2)" + \
                ("" if args.anchor == "full" else f"  [--anchor {args.anchor}]")
    common.save_figure_grid(rows, path, title)


# ================================================================ main


def main(argv=None):
    common.main(parse, build, show_views, NORM_STATS, argv)  # NORM_STATS: the MoCo demo's


if __name__ == "__main__":
    main()
