"""ContrastiveCrop: "Crafting Better Contrastive Views for Siamese Representation Learning".
Peng, Wang, Wang, You. CVPR 2022. arXiv 2202.03278. Official code: github.com/xyupeng/ContrastiveCrop

RandomResizedCrop (RRC) makes false positives (a view of pure background) and trivial pairs (two nearby
crops). ContrastiveCrop moves only the crop *centre*: a few times per run the training encoder's own
last-stage features give a label-free heatmap per image, thresholded into one box (localization); each
view's centre is then drawn inside that box from Beta(alpha, alpha) per axis with alpha < 1, a U-shaped
law that pushes the two views apart (center-suppressed sampling). Scale, ratio, the other augmentations,
networks and losses stay those of the base framework: SimCLR, MoCo v2, BYOL or SimSiam (common.py).

Paper -> code:
  Eq. 2, heatmap M = sum_c F_c of the last stage, min-max, upsampled    heatmap()
  Alg. 1, box = closure of the pixels with M > k                         boxes_from_features()
  Alg. 1, boxes of the whole training set (eval mode, no grad, sharded)  localize()
  Alg. 1, center-suppressed sampling with Beta(alpha, alpha)             contrastive_crop_box(), ContrastiveCropViews
  Sec. 4.2 / Table 3, warm-up and update interval (20% of the epochs)    loc_schedule(), updates_after(), BoxState
  base losses (SimCLR, MoCo v2, BYOL, SimSiam)                           common.build_framework

    # CPU smoke
    python contrastive_crop.py --dataset synthetic --subset 512 --batch-size 64 --epochs 5 --stem imagenet --gpus 0
      (32 px through the ImageNet stem leaves a 1x1 layer4 map, hence full boxes; --stem cifar localises for real)
    python contrastive_crop.py --dataset cifar10 --data DIR --download --framework simclr      # 1 GPU, 500 epochs
    python contrastive_crop.py --dataset imagenet --data DIR --gpus 8                         # MoCo v2, 100 epochs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 contrastive_crop.py --dataset imagenet --data DIR
    add --baseline (= --crop random), --crop simccrop, --alpha 1, --loc-interval 0 for the ablation arms;
    --show-views writes views.png and box_trajectory.png (from the checkpoint in --out, if any)
"""
import os, random, sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

import common

# ================================================================ loss
# ContrastiveCrop adds no loss: each framework keeps its own (common.nt_xent x t/0.07, info_nce, byol_loss,
# simsiam_loss). The method lives in the views below.

# ================================================================ localization (Alg. 1)

FULL_BOX, SIMCCROP_BOX = (0.0, 0.0, 1.0, 1.0), (0.25, 0.25, 0.75, 0.75)  # (y0, x0, y1, x1), height first


def heatmap(feats, size):
    """Eq. 2: channel sum of the last-stage features, min-max normalised per image (fp32), upsampled bilinearly.
    feats B x C x h x w -> (maps B x Hi x Wi in [0, 1], B bools: constant map)."""
    m = feats.float().sum(1)                                              # B x h x w
    lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
    flat = (hi - lo).flatten() < 1e-6
    m = (m - lo) / (hi - lo).clamp_min(1e-6)
    return F.interpolate(m[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0], flat


def boxes_from_features(feats, size, k=0.1):
    """Alg. 1: the rectangular closure of all heatmap pixels > k (strict), as normalised (y0, x0, y1, x1) with
    y1 = last row / Hi (official update_box). A constant map gives the full box. feats B x C x h x w -> B x 4."""
    m, flat = heatmap(feats, size)
    H, W = size
    on = m > k                                                            # B x Hi x Wi
    rows, cols = on.any(2).to(torch.uint8), on.any(1).to(torch.uint8)     # B x Hi, B x Wi
    boxes = torch.stack([rows.argmax(1) / H, cols.argmax(1) / W,          # argmax = first row/column on
                         (H - 1 - rows.flip(1).argmax(1)) / H, (W - 1 - cols.flip(1).argmax(1)) / W], 1)
    return torch.where(flat[:, None], torch.tensor(FULL_BOX, device=boxes.device), boxes.float())


def frames(source, indices):
    """Un-augmented training images (uint8 B x 3 x H x W) in the frame of the boxes: native size in memory, else
    Resize((224, 224)), which squashes as the official ImageNet code does; normalised boxes carry over to any size."""
    if source.in_memory:
        return source.images[torch.as_tensor(indices)]
    return torch.stack([TF.pil_to_tensor(TF.resize(source.pil(int(j)), [224, 224])) for j in indices])


@torch.no_grad()
def localize(backbone, data, args, k):
    """Boxes of every training image from the online backbone in eval mode, N x 4 on the CPU, identical on all
    ranks (common.extract_features: sharded, BN statistics averaged over ranks, as split-BN on one process). The
    frame: native size in memory, else Resize((224, 224)) (frames). Grads, BN statistics, train() are kept."""
    side = 224 if not data.train.in_memory else data.train.images.shape[-1]
    boxes = lambda net, x: boxes_from_features(common.feature_map(net, x), x.shape[-2:], k)  # layer4 map -> box
    return common.extract_features(backbone, data.train, side, data.mean, data.std, args.device,
                                   max(1, args.batch_size // common.get_world()), args.workers, fn=boxes,
                                   view="squash").cpu()


# ================================================================ views: center-suppressed crops (Alg. 1)

def _bounds(size, crop, lo, hi):
    """Top-left positions whose crop centre lies in [lo, hi] (normalised), both clamped so the crop stays inside."""
    return tuple(min(max(int(size * v) - crop // 2, 0), size - crop) for v in (lo, hi))


def contrastive_crop_box(H, W, box, alpha, scale=(0.2, 1.0), rng=random, ratio=(3 / 4, 4 / 3)):
    """Alg. 1: RandomResizedCrop's scale and ratio, but the crop centre drawn inside box = (y0, x0, y1, x1)
    (normalised) from Beta(alpha, alpha) per axis. Returns (top, left, height, width) in pixels."""
    y0, x0, y1, x1 = box

    def place(h, w, rng):
        (t_lo, t_hi), (l_lo, l_hi) = _bounds(H, h, y0, y1), _bounds(W, w, x0, x1)
        return (t_lo + int((t_hi - t_lo) * rng.betavariate(alpha, alpha)),   # alpha < 1: away from the middle
                l_lo + int((l_hi - l_lo) * rng.betavariate(alpha, alpha)))

    return common.rrc_box(H, W, scale, ratio, rng, place)


class ContrastiveCropViews:
    """views_fn: two views sharing the image's box and drawing independently, flip p=0.5 after the crop; plain
    RandomResizedCrop while `active` is 0. boxes (N x 4) and active are shared-memory tensors updated in place,
    so DataLoader workers (persistent or not) read the current ones."""

    def __init__(self, boxes, active, alpha, scale):
        self.boxes, self.active, self.alpha, self.scale = boxes, active, alpha, scale

    def __call__(self, index, hw, rng):
        (H, W), = hw
        crops = []
        for _ in range(2):
            if self.active.item():
                box = contrastive_crop_box(H, W, self.boxes[index].tolist(), self.alpha, self.scale, rng)
            else:
                box = common.rrc_box(H, W, self.scale, rng=rng)
            crops.append(common.Crop(*box, flip=rng.random() < 0.5))
        return crops


# ================================================================ schedule and method state

def loc_schedule(crop, epochs, warmup, interval):
    """(Wu, I) in epochs from fractions of --epochs (Table 3: 0.2 and 0.2). simccrop: active from epoch 1, fixed box."""
    if crop == "simccrop":
        return 0, 0
    return max(1, round(warmup * epochs)), (0 if crop == "random" or interval == 0
                                            else max(1, round(interval * epochs)))


def updates_after(e, epochs, Wu, I):
    """Boxes are recomputed after epoch e (1-based): every I epochs from the warm-up on, never after the last."""
    return I > 0 and e >= Wu and e % I == 0 and e != epochs


def is_active(crop, e, Wu):
    """Epoch e (1-based) samples with the boxes; derived from the epoch, so a resume cannot revert to RRC."""
    return crop != "random" and e > Wu


def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


class BoxState(common.State):
    """The method's state (checkpointed): boxes, the boxes of 4 fixed images after every update, the mean-area log.
    before_epoch recomputes the boxes from the model's heatmaps on the update schedule (attach gives it the model)."""

    def __init__(self, n, crop, alpha, box_thresh, Wu, I, seed):
        self.boxes = torch.tensor(SIMCCROP_BOX if crop == "simccrop" else FULL_BOX).repeat(n, 1).share_memory_()
        self.active = torch.zeros(1, dtype=torch.uint8).share_memory_()
        self.config = dict(crop=crop, alpha=alpha, box_thresh=box_thresh, warmup=Wu, interval=I)
        self.fixed = sorted(random.Random(seed).sample(range(n), min(4, n)))
        self.epoch, self.history, self.area_log = 0, {}, {}
        self.record(0)

    def attach(self, model, data, args, views):
        self.model, self.data, self.args, self.views = model, data, args, views

    def before_epoch(self, epoch):  # 0-based epoch about to start = the 1-based epoch that just ended
        a, c = self.args, self.config
        if updates_after(epoch, a.epochs, c["warmup"], c["interval"]):
            self.update(localize(self.model.backbone, self.data, a, a.box_thresh), epoch)
            if common.is_main():
                plot_views(a, self.data, self, self.model.backbone, self.views,
                           os.path.join(a.out, f"views_e{epoch}.png"))
                plot_trajectory(self.data, self, os.path.join(a.out, "box_trajectory.png"))
        self.start_epoch(epoch + 1)

    def start_epoch(self, e):
        self.epoch = e
        self.active.fill_(is_active(self.config["crop"], e, self.config["warmup"]))

    def record(self, e):
        a = box_area(self.boxes)
        self.history[e] = self.boxes[self.fixed].clone()
        self.area_log[e] = (a.mean().item(), (a > 0.9).float().mean().item())

    def update(self, boxes, e):
        self.boxes.copy_(boxes)  # in place: never rebind the tensor the workers hold
        self.record(e)
        common.print0(f"boxes updated after epoch {e}: mean area {self.area_log[e][0]:.3f}, "
                      f"{100 * self.area_log[e][1]:.1f}% with area > 0.9 (0.94 at 32 px = full boxes)")

    def epoch_logs(self):
        a = box_area(self.boxes)
        return {"crop": self.config["crop"], "crop_active": int(self.active.item()), "box_area": a.mean().item(),
                "box_area_gt_0.9": (a > 0.9).float().mean().item()}

    def state_dict(self):
        return dict(boxes=self.boxes.clone(), history=self.history, fixed=self.fixed, area_log=self.area_log,
                    config=self.config, epoch=self.epoch)

    def load_state_dict(self, sd):
        if sd["config"] != self.config:
            raise common.UserError(f"the checkpoint's ContrastiveCrop settings {sd['config']} differ from this run's "
                                   f"{self.config}; pass the same flags or another --out")
        self.boxes.copy_(sd["boxes"])
        self.history, self.fixed, self.area_log = sd["history"], sd["fixed"], sd["area_log"]
        self.start_epoch(sd["epoch"])


# ================================================================ figures (--show-views, and after each update)

def _px(box, H, W):
    y0, x0, y1, x1 = [float(v) for v in box]
    return y0 * H, x0 * W, max((y1 - y0) * H, 1), max((x1 - x0) * W, 1)


def plot_views(args, data, state, backbone, views, path):
    """Per fixed image: heatmap (alpha 0.5) with its k-contour and box; the box with 8 crops of the sampler (forced
    active) and their centres; the two views of the current epoch; centre offsets u against the uniform."""
    fr, dev, k, scale = frames(data.train, state.fixed), args.device, args.box_thresh, (args.crop_min_scale, 1.0)
    mean, std = (torch.tensor(v, device=dev).view(1, 3, 1, 1) for v in (data.mean, data.std))
    was = backbone.training
    with torch.no_grad():
        feats = common.feature_map(backbone.eval(), (fr.to(dev).float() / 255 - mean) / std)
    backbone.train(was)
    maps, found = heatmap(feats, fr.shape[-2:])[0].cpu(), boxes_from_features(feats, fr.shape[-2:], k).cpu()
    ds, sizes = common.ViewDataset(data.train, views, args.seed), views.sizes
    ds.epoch.fill_(state.epoch)
    batch = torch.utils.data.default_collate([ds[i] for i in state.fixed])
    shown = common.device_views(batch, data.train.images if data.train.in_memory else None, data.mean, data.std,
                                sizes, torch.device("cpu"))
    rows = []
    for r, i in enumerate(state.fixed):
        frame, native = fr[r].permute(1, 2, 0).numpy() / 255, np.asarray(data.train.pil(i)) / 255
        (H, W), box, rng = native.shape[:2], state.boxes[i].tolist(), random.Random(f"{args.seed}/show/{i}")
        crops = [contrastive_crop_box(H, W, box, args.alpha, scale, rng) for _ in range(8)]
        u = []  # on a 1000 px frame, free of pixel rounding: the law the sampler follows
        for t, l, h, w in (contrastive_crop_box(1000, 1000, box, args.alpha, scale, rng) for _ in range(2000)):
            u += [(p - lo) / (hi - lo) for p, (lo, hi) in ((t, _bounds(1000, h, box[0], box[2])),
                                                          (l, _bounds(1000, w, box[1], box[3]))) if hi > lo]

        def heat(ax, img=frame, m=maps[r].numpy()):
            ax.imshow(img)
            ax.imshow(m, alpha=0.5, cmap="jet")
            ax.contour(m, [k], colors="white")
            ax.axis("off")

        def sampled(ax, img=native, c=crops):
            ax.imshow(img)
            ax.plot([l + w / 2 for t, l, h, w in c], [t + h / 2 for t, l, h, w in c], "r.", ms=4)
            ax.axis("off")

        def offsets(ax, u=u):
            ax.hist(u, bins=20, range=(0, 1), density=True)
            ax.axhline(1, color="k", ls="--", label="uniform")
            ax.set(xlabel="u = (top - lo) / (hi - lo)", yticks=[])
            ax.legend(fontsize=6)

        rows.append([{"draw": heat, "title": f"image {i}: heatmap, k={k}",
                      "boxes": [(*_px(found[r], *frame.shape[:2]), "lime", "")]},
                     {"draw": sampled,
                      "title": f"box area {box_area(state.boxes[i:i + 1]).item():.2f}, alpha {args.alpha}",
                      "boxes": [(*_px(box, H, W), "lime", "")] + [(*c, "red", "") for c in crops]},
                     *({"img": common.denormalize(shown[v][r], data.mean, data.std), "title": f"view {v + 1}"}
                       for v in (0, 1)),
                     {"draw": offsets, "title": "centre offsets"}])
    common.save_figure_grid(rows, path,
                            f"ContrastiveCrop ({state.config['crop']}): boxes and views of epoch {state.epoch}, "
                            f"sampler {'active' if state.active.item() else 'inactive (RRC)'}")


def plot_trajectory(data, state, path):
    """Each fixed image with its box after every update (coloured and labelled by epoch and area);
    mean area per update."""
    import matplotlib
    epochs, cmap = sorted(state.history), matplotlib.colormaps["viridis"]
    row = []
    for r, i in enumerate(state.fixed):
        frame = frames(data.train, [i])[0].permute(1, 2, 0).numpy() / 255
        row.append({"img": frame, "title": f"image {i}", "boxes": [
            (*_px(state.history[e][r], *frame.shape[:2]), cmap(j / max(1, len(epochs) - 1)),
             f"e{e} {box_area(state.history[e][r:r + 1]).item():.2f}") for j, e in enumerate(epochs)]})

    def areas(ax):
        ax.plot(epochs, [state.area_log[e][0] for e in epochs], "o-")
        ax.set(xlabel="epoch", ylim=(0, 1.05))

    row.append({"title": "mean box area", "draw": areas})
    common.save_figure_grid([row], path, "ContrastiveCrop boxes after each update", tile=2.4)


# ================================================================ defaults and command line

SMALL = dict(arch="resnet18", stem="cifar", epochs=500, batch_size=512, lr=0.25, wd=1e-4, optimizer="sgd",
             warmup_epochs=0, box_thresh=0.1, loc_warmup=0.2, loc_interval=0.2, crop_min_scale=0.2)
IMAGENET = dict(SMALL, arch="resnet50", stem="imagenet", epochs=100, batch_size=256, lr=0.03)
DEFAULTS = {
    "cifar10": SMALL,       # official configs/small/cifar10/*_ccrop.py (lr 0.5 at batch 512), paper Table 1
    "cifar100": SMALL,      # configs/small/cifar100, Table 1
    "stl10": SMALL,         # configs/small/stl10 (train+unlabeled, 96 px, CIFAR-stem ResNet-18), Table 1
    "tinyimagenet": SMALL,  # configs/small/tiny200 (64 px), Table 1
    "imagenet100": IMAGENET,  # the paper's IN-200 settings, Table 2
    "imagenet": IMAGENET,   # configs/IN1K/mocov2_ccrop.py, Table 2
    "folder": dict(IMAGENET, stem="auto"),  # the imagenet row; auto: CIFAR stem for <= 64 px folders
    "synthetic": SMALL,     # the cifar10 row (tests, offline demos)
}
# Normalisation of the official configs (configs/small/<dataset>/*.py, configs/linear/*_res18.py), the same for all
# four frameworks; configs/IN1K and IN200 use the ImageNet constants, load_data's default.
NORM_STATS = {"cifar10": common.CIFAR_COMMON,
              "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
              "stl10": ((0.4406, 0.4273, 0.3858), (0.2312, 0.2265, 0.2237)),
              "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))}
IMAGENET_FRAMEWORK = {"mocov2": {},                                    # the rows above
                      "simclr": dict(batch_size=512, lr=0.025),          # paper Sec. 4.1 (0.05 at batch 512)
                      "simsiam": dict(batch_size=512, lr=0.05),          # the SimSiam paper
                      "byol": dict(batch_size=512, lr=0.05)}             # our choice: not in the paper


def parse(argv=None):
    p = common.base_parser(__doc__)
    p.set_defaults(seed=42)  # the official configs' seed
    a = p.add_argument
    a("--framework", default="mocov2", choices=["simclr", "mocov2", "byol", "simsiam"], help="base framework (mocov2)")
    a("--crop", default="ccrop", choices=["ccrop", "random", "simccrop"],
      help="ccrop: learned boxes after the warm-up; random: RRC (= --baseline); simccrop: fixed central box, alpha 0.1")
    a("--alpha", type=float, default=None, help="Beta(alpha, alpha) of the crop centre: 0.6 (Fig. 6b; 0.1 under "
      "simccrop); < 1 pushes views apart, 1 = uniform in the box")
    a("--box-thresh", type=float, default=None, help="heatmap threshold k in [0, 1): 0.1; above 0.2 hurts (Fig. 6a)")
    a("--loc-warmup", type=float, default=None, help="RRC-only warm-up, as a fraction of --epochs (0.2)")
    a("--loc-interval", type=float, default=None, help="box update interval, fraction of --epochs (0.2); 0 = never "
      "(suppression on the full image)")
    a("--crop-min-scale", type=float, default=None, help="min crop area as a fraction of the image (0.2)")
    a("--temperature", type=float, default=None, help="SimCLR 0.5 (loss x t/0.07), MoCo v2 0.2")
    a("--queue-size", type=int, default=None, help="MoCo v2 queue length K (65536); a multiple of --batch-size")
    a("--ema", type=float, default=None, help="EMA momentum of the key/target encoder (MoCo 0.999, BYOL 0.996)")
    argv = sys.argv[1:] if argv is None else argv
    fw = p.parse_known_args(argv)[0].framework
    defaults = {d: {**row, **(IMAGENET_FRAMEWORK[fw] if row["arch"] == "resnet50" else {}),
                    "bn_splits": 8 if fw == "mocov2" else 1}
                for d, row in DEFAULTS.items()}
    args = common.parse(p, defaults, "contrastive_crop", argv)
    if args.baseline:
        if args.crop == "simccrop":
            common.fail("--baseline means --crop random; drop --crop simccrop")
        args.crop = "random"
    args.alpha = args.alpha if args.alpha is not None else (0.1 if args.crop == "simccrop" else 0.6)
    if args.alpha <= 0 or not 0 <= args.box_thresh < 1 or not 0 < args.crop_min_scale <= 1:
        common.fail("need --alpha > 0, 0 <= --box-thresh < 1 and 0 < --crop-min-scale <= 1 (recommended 0.6, 0.1, 0.2)")
    if min(args.loc_warmup, args.loc_interval) < 0 or max(args.loc_warmup, args.loc_interval) > 1:
        common.fail("--loc-warmup and --loc-interval are fractions of --epochs in [0, 1] (recommended 0.2)")
    return args


def build(args, data):
    size = common.view_size(args, data)
    imagenet = args.dataset in ("imagenet", "imagenet100") or size >= 160
    backbone = common.build_backbone(args.arch, args.stem, zero_init_residual=args.framework == "simsiam")
    model = common.build_framework(args.framework, backbone, imagenet, args, contrastive_crop=True)
    if args.framework == "mocov2" and len(model.queue.queue) % args.batch_size:
        raise common.UserError(f"--queue-size {len(model.queue.queue)} must be a multiple of "
                               f"--batch-size {args.batch_size}")
    Wu, I = loc_schedule(args.crop, args.epochs, args.loc_warmup, args.loc_interval)
    state = BoxState(len(data.train), args.crop, args.alpha, args.box_thresh, Wu, I, args.seed)
    views = common.Views(ContrastiveCropViews(state.boxes, state.active, args.alpha, (args.crop_min_scale, 1.0)),
                         # all frameworks
                         [size, size], [common.mocov2_recipe(common.blurs("contrastive_crop", size))] * 2)
    state.attach(model, data, args, views)
    return common.Setup(model, views, state, lr_floor=0.0 if imagenet else 0.1, lr_per_epoch=True)


def show(args, data, setup, path):
    """--show-views: views.png (heatmaps, boxes, sampled crops and views) and box_trajectory.png of the run so far in
    --out (its checkpoint's network and boxes), or of the initial boxes."""
    state, ckpt = setup.state, os.path.join(args.out, "checkpoint.pth")
    if os.path.exists(ckpt):
        ck = common.load_checkpoint(ckpt, args, args.method, len(data.train) // args.batch_size)
        common.restore(ck, model=setup.model, state=state)
    else:
        state.start_epoch(1)
    trajectory = os.path.join(args.out, "box_trajectory.png")
    if common.is_main():
        plot_views(args, data, state, setup.model.to(args.device).backbone, setup.views, path)
        plot_trajectory(data, state, trajectory)
    return {"crop": args.crop, "epoch": state.epoch, "trajectory": trajectory}


def main(argv=None):
    common.main(parse, build, show, NORM_STATS, argv)  # NORM_STATS: the official configs'


if __name__ == "__main__":
    main()
