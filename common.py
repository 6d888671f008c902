"""common.py: everything the five methods share, written once.

Sections, in the order a training run uses them:
  1. launch and distributed   2. data and views        3. backbones and heads
  4. base frameworks          5. training loop         6. evaluation (kNN)
  7. checkpoints and export   8. plots                 9. command line

The training contract: a method script is parse(argv) -> args, build(args, data) -> Setup, and
common.main(parse, build, show). Setup(model, views, state=None, lr_floor=0.0, lr_per_epoch=False):
  views  Views(crops, sizes, recipes, sources=None, extra=None): crops(index, hw, rng) -> one Crop box per view, a
         module-level class (spawned workers pickle it); ViewDataset and device_views turn it into tensors.
  model  a common.Model: forward(views, batch) -> (loss, logs); .backbone (kNN, backbone.pth); .sync_bn;
         .param_groups(); .after_step() after each optimizer step; .progress = step / total, set before each step.
  state  optional method state outside the model: before_epoch(epoch), epoch_logs() -> dict, state_dict() and
         load_state_dict() (checkpointed under "state").
fit() = set-up, resume and epochs; train_one_epoch() = the step; end_of_epoch() = log, kNN, checkpoint. A checkpoint
is save(path, **named objects) and restore(checkpoint, **named objects): nothing is kept by a hand-written list.

Run as a script it pretrains one of the four base frameworks (SimCLR, MoCo-v2, BYOL, SimSiam):
    python common.py --framework simclr --dataset synthetic --epochs 2 --stem imagenet   # CPU smoke
    python common.py --framework mocov2 --dataset cifar10 --data DIR --download --gpus 1
    python common.py --framework byol --dataset imagenet --data DIR --gpus 8
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 common.py --framework mocov2 \\
        --dataset imagenet --data DIR
"""
import argparse, contextlib, copy, datetime, errno, faulthandler, functools, gc, json, math, os, random, signal, socket
import sys, time, traceback, warnings
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image


class UserError(Exception):
    """A mistake the user can fix. Printed as one line on stderr, exit status 2, no traceback."""


def fail(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# ================================================================ 1. launch and distributed

def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world():
    return dist.get_world_size() if is_dist() else 1


def is_main():
    return get_rank() == 0


def print0(*a, **k):
    if is_main():
        print(*a, **k, flush=True)


DIST_TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a silent rank (kNN passes included)


def use_cuda(args):
    """The training device: CUDA when present, unless --device cpu (or --gpus 0) asks for the CPU."""
    return torch.cuda.is_available() and getattr(args, "device_type", "auto") != "cpu" and args.gpus > 0


def launch(fn, args):
    """Run fn(args) in every process: under torchrun the environment decides; --gpus N spawns N local processes
    (GPUs, or with --device cpu CPU processes over gloo: the same path, which is how the tests run it)."""
    try:
        if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise UserError(f"{', '.join(missing)} not set while {'RANK' if 'RANK' in os.environ else 'WORLD_SIZE'}"
                                " is: launch with torchrun (which sets all four), or unset RANK/WORLD_SIZE")
            _worker(int(os.environ.get("LOCAL_RANK", 0)), fn, args, None)
        elif args.gpus > 1:
            have = torch.cuda.device_count()
            if getattr(args, "device_type", "auto") != "cpu" and have < args.gpus:
                raise UserError(f"--gpus {args.gpus} asks for {args.gpus} GPUs but this machine has {have}; "
                                f"pass --gpus {max(have, 1)}, or add --device cpu for {args.gpus} CPU processes")
            try:
                ranks = torch.multiprocessing.spawn(_worker, args=(fn, args, free_port()), nprocs=args.gpus, join=False)
                while not ranks.join(grace_period=10):  # after one rank fails, the others get 10 s to end themselves
                    pass
            except torch.multiprocessing.ProcessExitedException as e:  # the rank has already said why
                if e.exit_code is not None and e.exit_code < 0:
                    print(f"error: the process of rank {e.error_index} was killed by signal {-e.exit_code}",
                          file=sys.stderr, flush=True)
                sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)
        else:
            _worker(0, fn, args, None)
    except UserError as e:
        fail(e)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank, fn, args, port):
    if port is not None:  # spawned by --gpus N
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                          WORLD_SIZE=str(args.gpus), LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(args.gpus))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if hasattr(signal, "SIGUSR1"):  # a run that seems stuck: `kill -USR1 PID` prints where it is on the process's
        with contextlib.suppress(AttributeError, OSError, ValueError):  # stderr (forked DataLoader workers inherit
            faulthandler.register(signal.SIGUSR1, all_threads=True, file=sys.__stderr__)  # it); none without one
    cuda = use_cuda(args)
    if cuda:
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True  # every view has a fixed size: autotune the convolutions once
    args.device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    code = None
    try:
        if world > 1:
            _init_process_group(cuda, local_rank)
        fn(args)
        if world > 1:
            dist.barrier()  # all done before any process tears its connections down (gloo aborts a peer mid-read)
    except BaseException as e:
        _stop_workers()
        code = _report(e, world)
        if code is None:
            raise
    finally:
        if is_dist():
            dist.destroy_process_group()
    if code is not None:  # outside the except block: the traceback's frames, and their DataLoader workers, are freed
        gc.collect()
        sys.exit(code)


def _stop_workers():
    """On the way out after an error, shut this process's DataLoader workers down as DataLoader itself does, before
    the exception's frames are freed: freeing them first can unlink the queues' semaphores while a spawned worker is
    still starting, and that worker prints tracebacks of its own."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter as Running
    for it in [o for o in gc.get_objects() if type(o) is Running]:
        it._shutdown_workers()


def _init_process_group(cuda, local_rank):
    try:
        dist.init_process_group(**process_group_options(cuda, local_rank))
    except (RuntimeError, dist.DistError) as e:
        if "address already in use" in str(e).lower() or "EADDRINUSE" in str(e):
            raise UserError(f"port {os.environ['MASTER_PORT']} on {os.environ['MASTER_ADDR']} is in use; "
                            "pass another --master_port to torchrun (or MASTER_PORT)")
        raise


def process_group_options(cuda, local_rank):
    """nccl bound to this process's GPU on CUDA, gloo on the CPU; both with a timeout instead of a silent hang."""
    if cuda:
        return dict(backend="nccl", device_id=torch.device("cuda", local_rank), timeout=DIST_TIMEOUT)
    return dict(backend="gloo", timeout=DIST_TIMEOUT)


def _report(e, world):
    """Every rank speaks: one line on stderr for what a user can act on; None for a bug (its traceback is shown).
    Returns the exit status. With several processes the first rank to fail reports, so an error that every rank
    meets (bad flags, NaN) is said once; its exit ends the others (spawn and torchrun both stop the rest)."""
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else 1
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, UserError):
        message = _worker_message(str(e))
    elif isinstance(e, torch.OutOfMemoryError):
        message = (f"out of memory on {'rank ' + str(get_rank()) if world > 1 else 'the device'}; lower --batch-size "
                   "(it is global: per-process batch = batch / processes) or use --precision bf16")
    else:
        if world == 1:
            return None
        message = f"rank {get_rank()} failed with {type(e).__name__}: {_worker_message(str(e))}"
    if world > 1 and not _first_to_fail():
        return 2  # another rank failed first (this one then lost its peers): that rank has said why
    if not isinstance(e, (UserError, torch.OutOfMemoryError)):
        traceback.print_exc()
    if world > 1 and get_rank() != 0 and not message.startswith("rank "):
        message = f"rank {get_rank()}: {message}"
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def _first_to_fail():
    """An atomic count in the process group's key-value store: True for the first rank that fails. When the store is
    gone (its host, rank 0 or torchrun's agent, has exited after reporting), the others stay silent."""
    if not is_dist():
        return True  # failed before the group existed (e.g. its port): nobody else can have reported
    get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
    if get_store is None:
        return True  # a torch without this (private) accessor: every failing rank reports rather than none
    try:
        return get_store().add("ranks_failed", 1) == 1
    except Exception:
        return False


def _worker_message(text):
    """A DataLoader worker's error arrives wrapped in its traceback: keep the original message only."""
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]   # "common.UserError: cannot read ..."
    name, sep, rest = last.partition(": ")
    return rest if sep and " " not in name else last


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(get_world())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[get_rank()]


def gather_with_grad(x):
    """Concatenate x from all ranks (rank-major); gradients flow back to every rank's own rows."""
    if get_world() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x))


@torch.no_grad()
def gather_no_grad(x):
    """Concatenate x from all ranks (rank-major). Warning: no gradient flows through the result."""
    if get_world() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(get_world())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


# ================================================================ 2. data and views
# A view is a box plus a recipe: the method draws boxes (cheap, CPU), common.py crops and resizes them
# (in workers: torchvision decodes JPEGs, PIL the rest; or roi_align on the device for in-memory data) and
# applies the photometric recipe per sample on the training device.

# Default normalisation (mean, std) per dataset: the per-channel mean and std over all pixels of the training split
# for CIFAR (the values of solo-learn's solo/data/pretrain_dataloader.py; numpy on the 50k JPEG re-encoded CIFAR-10
# training images of ../shared/data gives mean 0.4913/0.4821/0.4465, std 0.2452/0.2428/0.2606: JPEG smooths a
# little), ImageNet's for every other dataset. A method whose official code uses other constants applies them with
# with_stats right after load_data (the "Normalisation constants" rows of README's fidelity tables).
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# CIFAR-10 constants of much public CIFAR code (MoCo's CIFAR demo, LoGo, ContrastiveCrop): the std is about the mean
# per-image std (0.2004/0.1987/0.2008 on the JPEG copy), not the dataset's, so inputs come out ~1.2x wider.
CIFAR_COMMON = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
# The dataset table: training-view side in px (None: the images' own side if they are small enough to keep in
# memory, else 224) and normalisation (mean, std).
DATASETS = {"cifar10": dict(size=32, stats=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
            "cifar100": dict(size=32, stats=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
            "stl10": dict(size=96, stats=IMAGENET_STATS),
            "tinyimagenet": dict(size=64, stats=IMAGENET_STATS),
            "imagenet100": dict(size=None, stats=IMAGENET_STATS),
            "imagenet": dict(size=None, stats=IMAGENET_STATS),
            "folder": dict(size=None, stats=IMAGENET_STATS),
            "synthetic": dict(size=32, stats=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))}
# Gaussian blur only on views of at least this side (px), each method as its paper or code has it: the base
# frameworks and LoGo from 96 (none on CIFAR, SimCLR appendix B.9), LeOCLR at ImageNet sizes (MoCo's CIFAR demo
# has none), CLIM and CO-SSL (solo-learn) on all but 32 px, ContrastiveCrop on ImageNet only (configs/small: none).
BLUR_FROM = {"base": 96, "logo": 96, "leoclr": 128, "clim": 33, "co_ssl": 33, "contrastive_crop": 160}


def blurs(method, size):
    """Whether `method`'s views of this side get Gaussian blur (BLUR_FROM)."""
    return size >= BLUR_FROM[method]


# Image files by extension, matched case-insensitively (.JPG, .Jpeg); names starting with "." are never scanned
# (.ipynb_checkpoints, .DS_Store, macOS's ._x.jpg resource forks).
IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
MIN_SIDE = 8  # px: a smaller image (a thumbnail, an icon) has no crops to learn from; it is named in an error


def _is_image(name):
    return not name.startswith(".") and name.lower().endswith(IMG_EXT)


def _check_side(path, w, h):
    if min(w, h) < MIN_SIDE:
        raise UserError(f"image {path} is {w}x{h} px, too small to crop (the shorter side must be at least {MIN_SIDE} "
                        "px); remove it, or upscale the images")


class Source:
    """One split: images in memory (uint8 N x 3 x H x W) or as files (decoded in workers), labels (-1 = none)."""

    def __init__(self, labels, images=None, files=None, classes=None, name=""):
        self.images, self.files, self.name = images, files, name
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.classes = classes or []

    def __len__(self):
        return len(self.labels)

    @property
    def in_memory(self):
        return self.images is not None

    @property
    def has_labels(self):
        return len(self.labels) > 0 and bool((self.labels >= 0).all())

    def pil(self, i):
        if self.in_memory:
            return Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
        return _open_rgb(self.files[i])

    def subset(self, n, spread=False):
        """The first n images, or with spread=True n evenly spaced ones (an ImageFolder lists its files by class)."""
        idx = (torch.linspace(0, len(self) - 1, min(n, len(self))).round().long() if spread
               else torch.arange(min(n, len(self))))
        return self.rows(idx)

    def rows(self, idx):
        """The images idx (a 1-D index tensor) with their labels, as a new Source."""
        return Source(self.labels[idx], None if self.images is None else self.images[idx],
                      None if self.files is None else [self.files[i] for i in idx.tolist()], self.classes, self.name)


def _open_rgb(path):
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {_one_line(e)}); remove or replace that file")
    _check_side(path, *im.size)
    return im


def _header_size(path):
    """(w, h) from the file's header alone, or None: a probe neither decodes nor judges the image data (a broken file is
    named by whichever process reads it, with its rank)."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return None


def _read_rgb(path):
    """uint8 3 x H x W, channels-last in memory. JPEGs by torchvision's libjpeg-turbo decoder: the same pixels as PIL's,
    as a tensor for cut_view's crops (~4x faster than PIL's resize); other files, and JPEGs it rejects, by PIL."""
    try:
        data = torchvision.io.read_file(path)
        if data[:2].tolist() == [0xFF, 0xD8]:  # the JPEG signature, not the name: ImageNet has PNGs named .JPEG
            image = torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB)  # gray and CMYK too
            _check_side(path, image.shape[-1], image.shape[-2])
            return image
    except RuntimeError:
        pass  # unreadable or broken: PIL tries the file too, and names it if it fails as well
    return torch.from_numpy(np.array(_open_rgb(path))).permute(2, 0, 1)


def synthetic_images(n, size=32, offset=0, classes=10):
    """Deterministic learnable images: class = shape (disk, square, triangle, ring, cross) x texture (solid, striped);
    position, size and both colours are random per index, so colour alone says nothing about the class. Shapes
    are large and stripes coarse so that the class survives the ImageNet stem at 32 px (the cheap CPU setting)."""
    def params(i):
        r = random.Random(f"synthetic-{i}")
        return [r.uniform(0.3, 0.7), r.uniform(0.3, 0.7), r.uniform(0.28, 0.42), r.uniform(0, 6.3),
                r.uniform(1.5, 2.5)] \
            + [r.random() for _ in range(6)]
    p = torch.tensor([params(offset + i) for i in range(n)])
    labels = torch.tensor([(offset + i) % classes for i in range(n)])
    cx, cy, rad, phase, freq = (p[:, k, None, None] for k in range(5))
    fg, bg = p[:, 5:8, None, None], p[:, 8:11, None, None]
    t = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    dx, dy = xx - cx, yy - cy
    d = (dx ** 2 + dy ** 2).sqrt()
    shape = labels % 5
    masks = torch.stack([d < rad,
                         (dx.abs() < 0.85 * rad) & (dy.abs() < 0.85 * rad),
                         (dy > -rad) & (dy < 0.8 * rad) & (dx.abs() < 0.6 * (dy + rad)),
                         (d - 0.7 * rad).abs() < 0.3 * rad,
                         ((dx.abs() < 0.3 * rad) & (dy.abs() < rad)) | ((dy.abs() < 0.3 * rad) & (dx.abs() < rad))], 1)
    mask = masks[torch.arange(n), shape].unsqueeze(1).float()
    stripes = (torch.sin(2 * math.pi * freq * (xx + yy) / (2 * rad) + phase) > 0).float().unsqueeze(1)
    fg = torch.where((labels // 5 % 2 == 1)[:, None, None, None], fg * (0.35 + 0.65 * stripes), fg)
    noise = 0.04 * torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(offset + i))
                                for i in range(n)])
    img = (mask * fg + (1 - mask) * (bg + noise)).clamp(0, 1)
    return (img * 255).round().to(torch.uint8), labels


def _folder(root, name, allow_flat=False):
    """ImageFolder layout (root/class/img), or with allow_flat a flat folder of images (no labels). Hidden files and
    folders (names starting with ".") are skipped everywhere; extensions match in any case (_is_image)."""
    layout = f"{root}/<class>/<image>.jpg" + (" or a flat folder of images" if allow_flat else "")
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder; expected {layout}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for c, cls in enumerate(classes):
        found = []
        for dirpath, dirs, names in os.walk(os.path.join(root, cls)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # os.walk descends into what is left
            found.append((dirpath, sorted(f for f in names if _is_image(f))))
        for dirpath, names in sorted(found):
            files += [os.path.join(dirpath, f) for f in names]
            labels += [c] * len(names)
    if not files and allow_flat:
        files = [os.path.join(root, f) for f in sorted(os.listdir(root)) if _is_image(f)]
        labels, classes = [-1] * len(files), []
    if not files:
        raise UserError(f"no images found under {root}; expected {layout}")
    return Source(labels, files=files, classes=classes, name=name)


def _maybe_in_memory(src, max_side=96):
    """Small images (CIFAR-like folders) are decoded once and kept as one uint8 tensor. Every image opened here (the
    first always, all of them for an in-memory candidate) is checked for size (_open_rgb); file data is checked again
    as it is read."""
    first = _open_rgb(src.files[0])
    probe = [s for s in map(_header_size, src.files[::max(1, len(src) // 16)]) if s]  # not the first alone
    src.side_hint = sorted(min(size) for size in probe)[len(probe) // 2]  # the median shorter side (folder_like)
    if max(first.size) > max_side or len(src) > 300_000 or any(size != first.size for size in probe):
        return src
    arr = np.empty((len(src), first.size[1], first.size[0], 3), np.uint8)
    for i, f in enumerate(src.files):
        im = _open_rgb(f)
        if im.size != first.size:
            return src
        arr[i] = np.asarray(im)
    return Source(src.labels, images=torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), files=src.files,
                  classes=src.classes, name=src.name)


TV_SETS = ("cifar10", "cifar100", "stl10")  # torchvision's own files, which --download fetches
# What --data must hold, per dataset (said when it does not).
LAYOUT = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/", "stl10": "stl10_binary/",
          "tinyimagenet": "train/ and val/ (the tiny-imagenet-200 folder)",
          "imagenet": "train/<wnid>/<image>.JPEG and val/<wnid>/<image>.JPEG",
          "imagenet100": "train/<wnid>/<image>.JPEG and val/<wnid>/<image>.JPEG",
          "folder": "<class>/<image>.jpg (or train/<class>/... and an optional val/<class>/...) or just images"}


def _one_line(e):
    """An exception's message on one line (a URLError's reason without its wrapping), else its type's name."""
    return " ".join(str(getattr(e, "reason", None) or e).split()) or type(e).__name__


def _tv(cls, name, layout, **kw):
    """A torchvision dataset; missing files (without download) and a failed download are said in one line."""
    root = kw["root"]
    try:
        return _rank0_first(functools.partial(cls, **kw)) if kw.get("download") else cls(**kw)
    except (RuntimeError, OSError) as e:  # urllib's URLError and HTTPError are OSErrors
        if kw.get("download"):
            raise UserError(f"downloading {name} into {root} failed ({type(e).__name__}: {_one_line(e)}); check the "
                            f"network, or place the files there yourself ({root}/{layout}) and run again")
        if isinstance(e, RuntimeError) and any(w in str(e).lower() for w in ("not found", "download")):
            raise UserError(f"{name} not found under {root} (expected {root}/{layout}); pass --download to fetch it, "
                            "or --data DIR where it lies")
        raise


def _rank0_first(fn):
    """fn() in rank 0 first, the other processes waiting, then in them: one download, not one per process writing
    the same files (torchvision then finds them and only checks them). Rank 0 failing ends the others' wait."""
    if not is_dist():
        return fn()
    if get_rank() == 0:
        out = fn()
        dist.barrier()
        return out
    dist.barrier()
    return fn()


def _check_root(name, root, download):
    """--data must be a folder (made here for a download); a file is named with what to pass instead."""
    if os.path.isfile(root):
        archive = root.lower().endswith((".tar", ".gz", ".tgz", ".zip", ".bz2", ".xz", ".7z"))
        raise UserError(f"--data {root} is a file, not a folder; pass --data DIR, the folder that holds "
                        f"{LAYOUT[name]}" + ("; extract the archive and pass the folder it makes" if archive else "")
                        + ("; or add --download with a new folder to fetch it there" if name in TV_SETS else ""))
    if name in TV_SETS and download:
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --data {root} to download {name} into ({type(e).__name__}: "
                            f"{_one_line(e)}); pass --data DIR that you can write to")
    elif not os.path.exists(root):
        raise UserError(f"--data {root} does not exist; pass --data DIR holding {name} ({LAYOUT[name]})"
                        + (" or add --download to fetch it there" if name in TV_SETS else ""))


def _read_class_list(path):
    """--class-list: class (folder) names, one a line, in order, duplicates once."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserError(f"--class-list {path} {'is a folder' if os.path.isdir(path) else 'does not exist'}; "
                        "pass a text file with one class folder name (ImageNet: wnid) a line")
    try:
        with open(path) as f:
            keep = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --class-list {path} ({type(e).__name__}); pass a text file, one class a line")
    if not keep:
        raise UserError(f"--class-list {path} names no class; write one class folder name (wnid) a line")
    return keep


def _align_classes(val, classes, train_dir, val_dir):
    """val's labels re-indexed to the training classes by name: a class val lacks is fine; a val class (with images)
    that training lacks is an error naming it and both folders."""
    index = {c: i for i, c in enumerate(classes)}
    used = set(val.labels.tolist())
    unknown = [c for i, c in enumerate(val.classes) if c not in index and i in used]
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise UserError(f"class {', '.join(repr(c) for c in unknown[:3])}{more} of {val_dir} has no folder in "
                        f"{train_dir}; the val classes must be training classes (matched by folder name): rename or "
                        "remove it")
    remap = torch.tensor([index.get(c, -1) for c in val.classes], dtype=torch.long)
    return Source(remap[val.labels], files=val.files, classes=list(classes), name=val.name)


Data = namedtuple("Data", "train knn_train knn_val mean std")


def load_data(args):
    """Training source plus the labelled kNN memory/query splits (None where there are no labels)."""
    name, root = args.dataset, os.path.expanduser(args.data)
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    mean, std = DATASETS[name]["stats"]
    if name == "synthetic":
        n = args.subset or 5000
        train = Source(*reversed(synthetic_images(n)), name="synthetic-train")
        val = Source(*reversed(synthetic_images(1000, offset=10 ** 6)), name="synthetic-val")
        return Data(train, train, val, mean, std)
    class_list = getattr(args, "class_list", None)
    if class_list and name not in ("imagenet", "imagenet100", "folder"):
        raise UserError(f"--class-list selects classes of imagenet, imagenet100 or folder data, not of {name}; "
                        "drop it")
    _check_root(name, root, getattr(args, "download", False))
    if name in TV_SETS:
        dl, layout = args.download, LAYOUT[name]
        if name == "stl10":
            tv = torchvision.datasets.STL10
            tr = _tv(tv, "STL-10", layout, root=root, split="train+unlabeled", download=dl)
            lab = _tv(tv, "STL-10", layout, root=root, split="train", download=dl)
            te = _tv(tv, "STL-10", layout, root=root, split="test", download=dl)
            mk = lambda d, s: Source(d.labels, images=torch.from_numpy(d.data), name=f"stl10-{s}")
            train, knn_train, val = mk(tr, "train+unlabeled"), mk(lab, "train"), mk(te, "test")
            train.labels[:] = -1
        else:
            tv = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            mk = lambda d, s: Source(d.targets, images=torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),
                                     classes=d.classes, name=f"{name}-{s}")
            train = mk(_tv(tv, name.upper(), layout, root=root, train=True, download=dl), "train")
            val = mk(_tv(tv, name.upper(), layout, root=root, train=False, download=dl), "val")
            knn_train = train
    elif name == "tinyimagenet":
        tr_dir, ann = os.path.join(root, "train"), os.path.join(root, "val", "val_annotations.txt")
        for need in (tr_dir, ann):
            if not os.path.exists(need):
                raise UserError(f"{need} not found; --data must be the tiny-imagenet-200 folder (train/, val/)")
        train = _folder(tr_dir, "tinyimagenet-train")
        cls = {c: i for i, c in enumerate(train.classes)}
        rows = [line.split("\t")[:2] for line in open(ann) if line.strip()]
        unknown = sorted({c for _, c in rows if c not in cls})
        if unknown:
            raise UserError(f"{ann} names class {unknown[0]!r}"
                            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                            + f", which has no folder in {tr_dir}; --data must be one whole tiny-imagenet-200 folder")
        val = Source([cls[c] for _, c in rows], files=[os.path.join(root, "val", "images", f) for f, _ in rows],
                     classes=train.classes, name="tinyimagenet-val")
        train, val = _maybe_in_memory(train), _maybe_in_memory(val)
        knn_train = train
    else:  # imagenet, imagenet100, folder
        tr_dir = os.path.join(root, "train")
        has_split = os.path.isdir(tr_dir)
        train = _folder(tr_dir if has_split else root, f"{name}-train", allow_flat=(name == "folder"))
        va_dir = os.path.join(root, "val")
        val = _folder(va_dir, f"{name}-val") if has_split and os.path.isdir(va_dir) else None
        if class_list:
            keep = _read_class_list(class_list)
            train = _select_classes(train, keep, class_list)
            if val is not None:  # a selected class that val lacks is fine; val's other classes are dropped
                val = _select_classes(val, [c for c in keep if c in val.classes], class_list)
                val = val if len(val) else None
        if name == "imagenet100" and len(train.classes) != 100:
            raise UserError(f"imagenet100 expects 100 classes under {root}, found {len(train.classes)}; "
                            "pass --class-list FILE (one wnid a line) to select them from a full ImageNet root")
        val = _align_classes(val, train.classes, tr_dir, va_dir) if val is not None and train.has_labels else None
        train = _maybe_in_memory(train.subset(args.subset, spread=True) if args.subset else train)
        val = _maybe_in_memory(val) if val is not None else None
        knn_train = train if train.has_labels and val is not None else None
        if knn_train is None:
            val = None
    if args.subset and name in ("cifar10", "cifar100", "stl10", "tinyimagenet"):  # ImageFolder roots: done above
        train = train.subset(args.subset, spread=name == "tinyimagenet")
        knn_train = train if knn_train is not None and name != "stl10" else knn_train
    return Data(train, knn_train, val, mean, std)


def with_stats(data, stats):
    """data normalised with stats = (mean, std) instead of its dataset's defaults (training views, kNN monitor,
    localization); None keeps the defaults."""
    return data if stats is None else data._replace(mean=tuple(stats[0]), std=tuple(stats[1]))


def _select_classes(src, keep, path=""):
    """The images of the classes `keep` (names, in their order: the new labels), from a Source of files."""
    missing = [c for c in keep if c not in src.classes]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"--class-list {path or 'FILE'} names classes that {src.name} lacks: "
                        f"{', '.join(missing[:3])}{more}; it has {len(src.classes)} class folders")
    new = {src.classes.index(c): i for i, c in enumerate(keep)}
    idx = [i for i, l in enumerate(src.labels.tolist()) if l in new]
    return Source([new[int(src.labels[i])] for i in idx], files=[src.files[i] for i in idx], classes=keep,
                  name=src.name)


def native_size(source):
    """Side of the training images when they are all alike (in memory), else None (large, varied images)."""
    return source.images.shape[-1] if source.in_memory else None


def image_side(source):
    """The images' side: native when they are alike, else a folder's median shorter side (of 16 probed), else None."""
    return native_size(source) or getattr(source, "side_hint", None)


def sample_rng(seed, epoch, index):
    """Every random choice about a sample's views comes from this generator: results do not depend on
    the number of processes or workers."""
    return random.Random(f"{seed}/{epoch}/{index}")


def rrc_box(H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng=random, place=None):
    """RandomResizedCrop geometry (torchvision's algorithm): returns (top, left, height, width) in pixels.
    place(h, w, rng) -> (top, left) positions an accepted h x w crop: uniform by default (ContrastiveCrop: the
    centre drawn inside its box)."""
    area = H * W
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            return (*place(h, w, rng), h, w) if place else (rng.randint(0, H - h), rng.randint(0, W - w), h, w)
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, round(W / min(ratio))
    elif in_ratio > max(ratio):
        h, w = H, round(H * max(ratio))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


# Columns of the photometric parameters (B x Recipe.NPARAM) that Recipe.draw fills and photometric reads.
P_ON, P_BRIGHT, P_CONTRAST, P_SAT, P_HUE, P_ORDER, P_GRAY, P_SIGMA, P_SOLARIZE = 0, 1, 2, 3, 4, slice(5, 9), 9, 10, 11
P_FACTORS = slice(P_BRIGHT, P_HUE + 1)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # jitter op ids (torchvision's fn_idx); op k's factor is P_FACTORS[k]


class Recipe:
    """Photometric recipe of one view: colour jitter (random order) p_jitter, grayscale, blur, solarize.
    draw() returns the NPARAM per-sample parameters that travel with the batch to the device."""
    NPARAM = 12

    def __init__(self, jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.0, p_solarize=0.0):
        self.jitter, self.p_jitter, self.p_gray, self.p_blur, self.p_solarize = (jitter, p_jitter, p_gray, p_blur,
                                                                                 p_solarize)

    def draw(self, rng):
        """One sample's parameters by column: P_ON (jitter applies), P_BRIGHT, P_CONTRAST, P_SAT, P_HUE (the factors),
        P_ORDER (the op ids BRIGHTNESS..HUE in the order they apply), P_GRAY, P_SIGMA (blur sigma, 0: no blur),
        P_SOLARIZE. The draws' order is fixed: changing it changes every seeded run."""
        b, c, s, h = self.jitter
        on = rng.random() < self.p_jitter
        factors = [rng.uniform(max(0, 1 - b), 1 + b), rng.uniform(max(0, 1 - c), 1 + c),
                   rng.uniform(max(0, 1 - s), 1 + s), rng.uniform(-h, h)]
        order = list(range(4))
        rng.shuffle(order)
        gray = rng.random() < self.p_gray
        sigma = rng.uniform(0.1, 2.0)
        blur = rng.random() < self.p_blur
        sol = rng.random() < self.p_solarize
        return [float(on), *factors, *order, float(gray), sigma if blur else 0.0, float(sol)]

    def __repr__(self):
        return (f"Recipe(jitter={self.jitter}, p_jitter={self.p_jitter}, p_gray={self.p_gray}, p_blur={self.p_blur}, "
                f"p_solarize={self.p_solarize})")


def mocov2_recipe(blur):
    """MoCo-v2 "aug+" (blur only at ImageNet sizes, as the official CIFAR demo)."""
    return Recipe(p_blur=0.5 if blur else 0.0)


def simclr_recipe(blur, strength=1.0):
    """SimCLR: jitter 0.8s,0.8s,0.8s,0.2s with p 0.8, grayscale 0.2, blur p 0.5 at ImageNet sizes."""
    return Recipe(jitter=(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength), p_blur=0.5 if blur else 0.0)


def byol_recipes(blur=True):
    """BYOL's asymmetric pair: blur 1.0/0.1, solarize 0/0.2 (no blur at 32 px, as solo-learn's CIFAR config)."""
    return (Recipe(jitter=(0.4, 0.4, 0.2, 0.1), p_blur=1.0 if blur else 0.0),
            Recipe(jitter=(0.4, 0.4, 0.2, 0.1), p_blur=0.1 if blur else 0.0, p_solarize=0.2))


Crop = namedtuple("Crop", "top left height width flip src", defaults=(False, 0))


class RandomResizedCrops:
    """Views.crops of n independent RandomResizedCrop boxes (scale, ratio 3/4-4/3) with flip p=0.5. Crop samplers
    are module-level classes, never closures: under --gpus N the DataLoader workers are spawned and pickle them."""

    def __init__(self, n, scale):
        self.n, self.scale = n, tuple(scale)

    def __call__(self, index, hw, rng):
        (H, W), = hw
        return [Crop(*rrc_box(H, W, self.scale, rng=rng), rng.random() < 0.5) for _ in range(self.n)]


Views = namedtuple("Views", "crops sizes recipes sources extra", defaults=(None, None))
Views.__doc__ = """A method's views: crops(index, hw, rng) -> [Crop per view]; the views' sizes (px) and colour
recipes; optional sources(index, rng) -> the source images the crops refer to by position (default [index]) and
extra(index, rng) -> more per-sample tensors for the batch (e.g. mixing parameters)."""


class ViewDataset(torch.utils.data.Dataset):
    """dataset[i] -> dict(index, label, src, boxes, flips, photo[, view0, view1, ...]) for the Views `views`.

    For in-memory data only the boxes travel (cropped on the device); otherwise each source image is decoded once
    (torchvision for JPEGs, else PIL) and each view cropped and resized here as a tensor; pil=True keeps the former
    all-PIL path, the reference that tests and tests/benchmark.py compare with. `epoch` is a shared tensor so
    persistent workers see it change."""

    def __init__(self, source, views, seed, pil=False):
        self.source, self.views, self.seed, self.pil = source, views, seed, pil
        self.epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        rng = sample_rng(self.seed, int(self.epoch), i)
        v = self.views
        srcs = v.sources(i, rng) if v.sources else [i]
        if self.source.in_memory:
            imgs, hw = None, [tuple(self.source.images.shape[-2:])] * len(srcs)
        elif self.pil:
            imgs = [self.source.pil(j) for j in srcs]
            hw = [(im.height, im.width) for im in imgs]
        else:
            imgs = [_read_rgb(self.source.files[j]) for j in srcs]
            hw = [tuple(im.shape[-2:]) for im in imgs]
        crops = v.crops(i, hw, rng)
        item = {"index": i, "label": self.source.labels[i],
                "src": torch.tensor([srcs[c.src] for c in crops]),
                "boxes": torch.tensor([[c.top, c.left, c.height, c.width] for c in crops], dtype=torch.float32),
                "flips": torch.tensor([c.flip for c in crops]),
                "photo": torch.tensor([r.draw(rng) for r in v.recipes], dtype=torch.float32)}
        if v.extra:
            item.update(v.extra(i, rng))
        if imgs is not None:
            for k, (c, s) in enumerate(zip(crops, v.sizes)):
                item[f"view{k}"] = cut_view(imgs[c.src], c, s)
        return item


def cut_view(image, c, size):
    """One view: the box of Crop c resized to size x size (antialiased bilinear), flipped if c.flip -> uint8 3 x S x S.
    image: a PIL image (box resampled as PIL does, its filter reaching past the box edges) or a channels-last uint8
    tensor (the box cut first, as torchvision's RandomResizedCrop on tensors; interior pixels equal PIL's)."""
    if isinstance(image, Image.Image):
        v = image.resize((size, size), Image.BILINEAR, box=(c.left, c.top, c.left + c.width, c.top + c.height))
        v = v.transpose(Image.FLIP_LEFT_RIGHT) if c.flip else v
        return torch.from_numpy(np.asarray(v).copy()).permute(2, 0, 1)
    # a dense channels-last copy of the box takes torch's vectorised uint8 resampler; the strided box: up to 2x slower
    box = image[None, :, c.top:c.top + c.height, c.left:c.left + c.width].contiguous(memory_format=torch.channels_last)
    v = F.interpolate(box, size=(size, size), mode="bilinear", antialias=True)[0]
    return v.flip(-1) if c.flip else v


def crop_resize(images, boxes, size):
    """Batched crop+resize on the device: images uint8/float B x 3 x H x W, boxes B x 4 (top, left, h, w) ->
    float 0..255."""
    from torchvision.ops import roi_align
    t, l, h, w = boxes.to(images.device).float().unbind(1)
    rois = torch.stack([torch.arange(len(boxes), device=images.device, dtype=torch.float32), l, t, l + w, t + h], 1)
    return roi_align(images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _gray(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _hue6(x, maxc, span):
    """Hue x 6 in [-1, 5) as torchvision's _rgb2hsv (before its mod 1), with the same tie rules; span = max - min."""
    r, g, b = x.unbind(1)
    rc, gc, bc = ((maxc - x) / torch.where(span == 0, 1.0, span)).unbind(1)
    return torch.where(maxc[:, 0] == r, bc - gc, torch.where(maxc[:, 0] == g, 2.0 + rc - bc, 4.0 + gc - rc))


def adjust_hue(x, hue):
    """torchvision's RGB -> HSV -> hue + shift -> RGB in closed form: each channel is max - (max - min) * w(k) with
    k = (n + 6 (hue + shift)) mod 6, n = 5, 3, 1 for R, G, B, w = clamp(min(k, 4 - k), 0, 1): _hsv2rgb's sector table.
    hue: B shifts in [-0.5, 0.5]."""
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    span = maxc - minc
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # built on the device: no host copy
    h = torch.remainder(_hue6(x, maxc, span).unsqueeze(1) + 6.0 * hue.view(-1, 1, 1, 1), 6.0)  # shifted hue x 6
    k = torch.remainder(n + h, 6.0)  # wrapping h first keeps sums small: 8e-7 from float64 (torchvision: 1e-6)
    return maxc - span * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def gaussian_blur(x, sigma):
    """Per-sample Gaussian blur (separable, reflect padding), kernel 10% of the side, as SimCLR."""
    B, C, H, W = x.shape
    k = max(3, int(0.1 * min(H, W)) // 2 * 2 + 1)
    r = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=x.device)
    ker = torch.exp(-0.5 * (r.view(1, -1) / sigma.clamp(min=1e-3).view(-1, 1)) ** 2)
    ker = (ker / ker.sum(1, keepdim=True)).unsqueeze(1).expand(B, C, k).reshape(B * C, k)  # one kernel per channel
    y = F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, ker.view(B * C, 1, k, 1), groups=B * C)
    y = F.conv2d(y, ker.view(B * C, 1, 1, k), groups=B * C)
    return y.view(B, C, H, W)


# On CUDA photometric runs compiled: its element-wise ops fuse into a few kernels. CPU runs stay eager (no compile
# time in tests); False runs the eager path on CUDA too.
COMPILE_PHOTOMETRIC = True


def photometric(x, p):
    """x float B x 3 x H x W in [0, 1]; p B x NPARAM from Recipe.draw (the P_* columns). Independent parameters per
    sample; torchvision's ColorJitter -> RandomGrayscale -> GaussianBlur -> RandomSolarize, same formulas."""
    p = p.to(x.device, non_blocking=True)
    if x.is_cuda and COMPILE_PHOTOMETRIC:
        return _compiled_photometric()(x, p)
    return _photometric(x, p)


@functools.cache
def _compiled_photometric():
    return torch.compile(_photometric, dynamic=False)  # one graph per view shape: a method has at most a few


def _jitter_slots(p):
    """ColorJitter's per-sample order laid out on 7 slots with hue always in slot 3, so hue runs once per batch:
    slots 0-2 hold the ops drawn before hue (right-aligned), 4-6 those after it; an empty slot is the identity.
    Each other slot is one blend x' = clamp(a x + c_gray gray(x) + c_mean mean(gray(x))), torchvision's _blend with
    ratio a and target 0 (brightness), the gray mean (contrast) or the gray image (saturation); identity: a = 1.
    Returns 7 per-slot (a, c_gray, c_mean), each B x 1 x 1 x 1."""
    order = p[:, P_ORDER].long()
    pos = (order == HUE).long().argmax(1, keepdim=True) + torch.arange(-3, 4, device=p.device)  # B x 7 positions
    op = torch.where((pos >= 0) & (pos < 4) & (p[:, P_ON:P_ON + 1] > 0), order.gather(1, pos.clamp(0, 3)), HUE)
    a = torch.where(op == HUE, 1.0, p[:, P_FACTORS].gather(1, op))
    coef = torch.stack([a, (1.0 - a) * (op == SATURATION), (1.0 - a) * (op == CONTRAST)])  # 3 x B x 7
    return coef.permute(2, 0, 1)[..., None, None, None].unbind(0)


def _photometric(x, p):
    col = lambda v: v.view(-1, 1, 1, 1)
    for slot, (a, c_gray, c_mean) in enumerate(_jitter_slots(p)):
        if slot == 3:  # ColorJitter skips hue when its factor is None (hue=0); the round trip is not bit-exact
            x = torch.where(col((p[:, P_ON] > 0) & (p[:, P_HUE] != 0)), adjust_hue(x, p[:, P_HUE]), x)
        else:
            gray = _gray(x)
            x = (a * x + c_gray * gray + c_mean * gray.mean((1, 2, 3), keepdim=True)).clamp(0.0, 1.0)
    x = torch.where(col(p[:, P_GRAY] > 0), _gray(x).expand_as(x), x)
    x = torch.where(col(p[:, P_SIGMA] > 0), gaussian_blur(x, p[:, P_SIGMA]), x)
    return torch.where(col(p[:, P_SOLARIZE] > 0) & (x >= 0.5), 1.0 - x, x)


@functools.cache
def _channel_constant(values, device):
    """1 x 3 x 1 x 1 tensor of per-channel values, made once per device: a host-to-device copy per step would sync."""
    return torch.tensor(values, device=device).view(1, 3, 1, 1)


def device_views(batch, images, mean, std, sizes, device, channels_last=False):
    """uint8 crops (or in-memory images + boxes) -> normalised float views on the training device."""
    mean, std = _channel_constant(tuple(mean), device), _channel_constant(tuple(std), device)
    out = []
    for k, s in enumerate(sizes):
        if images is not None:
            src = batch["src"][:, k].to(device, non_blocking=True)
            v = crop_resize(images[src], batch["boxes"][:, k], s)
            flip = batch["flips"][:, k].to(device, non_blocking=True).view(-1, 1, 1, 1)
            v = torch.where(flip, v.flip(-1), v)
        else:
            v = batch[f"view{k}"].to(device, non_blocking=True).float()
        v = photometric(v / 255.0, batch["photo"][:, k])
        v = (v - mean) / std
        out.append(v.contiguous(memory_format=torch.channels_last) if channels_last else v)
    return out


class GlobalBatchSampler:
    """Shuffles by (seed, epoch), cuts global batches (drop_last), gives each rank a contiguous slice,
    so a 1-process run sees exactly the union of what N processes see."""

    def __init__(self, n, global_batch, seed, rank=0, world=1):
        if global_batch % world:
            raise UserError(f"--batch-size {global_batch} must be divisible by the {world} processes")
        if n < global_batch:
            raise UserError(f"--batch-size {global_batch} is larger than the {n} training images; lower it")
        self.n, self.gb, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def batches_per_epoch(self):
        return self.n // self.gb

    def __len__(self):
        return self.batches_per_epoch() - self.skip

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        lb = self.gb // self.world
        for b in range(self.skip, self.batches_per_epoch()):
            yield perm[b * self.gb + self.rank * lb: b * self.gb + (self.rank + 1) * lb].tolist()


# ================================================================ 3. backbones and heads

ARCHS = ["resnet18", "resnet34", "resnet50"]


def build_backbone(arch="resnet18", stem="cifar", zero_init_residual=False, rf_layout=None, rf_mlp=False):
    """torchvision ResNet with fc removed; `backbone(x)` is the pooled feature, `backbone.out_dim` its width.
    stem 'cifar' = 3x3 stride-1 conv1 and no max-pool. rf_layout (one int per stage) keeps that many leading
    3x3 convs per stage and turns the others into 1x1 (same stride), bounding the receptive field; rf_mlp
    adds Linear-BN-ReLU-Linear after pooling (kept in `fc`, so the state dict stays torchvision's)."""
    if arch not in ARCHS:
        raise UserError(f"unknown --arch '{arch}'; choose one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    if rf_layout:
        for layer, keep in zip([net.layer1, net.layer2, net.layer3, net.layer4], rf_layout):
            convs = [(blk, n) for blk in layer for n in ("conv1", "conv2") if getattr(blk, n).kernel_size == (3, 3)]
            for blk, n in convs[keep:]:
                old = getattr(blk, n)
                setattr(blk, n, nn.Conv2d(old.in_channels, old.out_channels, 1, old.stride, 0, bias=False))
    net.out_dim = net.fc.in_features
    d = net.out_dim
    net.fc = (nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, d)) if rf_mlp
              else nn.Identity())
    net.arch_meta = dict(arch=arch, stem=stem, rf_layout=list(rf_layout) if rf_layout else None, rf_mlp=bool(rf_mlp))
    return net


def feature_map(net, x):
    """The last stage before pooling (ResNet layer4 after its final ReLU): B x C x h x w."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def mlp(dims, bn=True, last_bn=False, last_affine=True):
    """Linear layers over dims; hidden layers are Linear-BN-ReLU (no bias before BN) or Linear-ReLU;
    optional BN (affine or not) after the last Linear, which then has no bias."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not (bn and not last) and not (last and last_bn)))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)] if bn else [nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=last_affine))
    return nn.Sequential(*layers)


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d or 2d) over `splits` contiguous chunks of the batch: one device stands in for `splits` GPUs
    (MoCo's official CIFAR demo). Eval mode is plain BN; parameters and buffers keep torchvision names."""

    def __init__(self, num_features, splits, **kw):
        super().__init__(num_features, **kw)
        self.splits = splits

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2D to 4D input (got {x.dim()}D)")

    def forward(self, x):
        s, N, C, rest = self.splits, x.shape[0], x.shape[1], x.shape[2:]
        if not self.training or s == 1:
            return super().forward(x)
        if N % s:
            raise RuntimeError(f"split-BN over {s} chunks got a batch of {N}; the batch must be a multiple of {s}")
        self.num_batches_tracked += 1
        rm, rv = self.running_mean.repeat(s), self.running_var.repeat(s)
        w, b = (None, None) if self.weight is None else (self.weight.repeat(s), self.bias.repeat(s))
        xs = x.reshape(s, N // s, C, *rest).transpose(0, 1).reshape(N // s, s * C, *rest)   # chunk k -> channels k
        y = F.batch_norm(xs, rm, rv, w, b, True, self.momentum, self.eps)
        self.running_mean.copy_(rm.view(s, C).mean(0))
        self.running_var.copy_(rv.view(s, C).mean(0))
        return y.reshape(N // s, s, C, *rest).transpose(0, 1).reshape(N, C, *rest)


def convert_split_bn(module, splits):
    """Replace every BatchNorm1d/2d by SplitBatchNorm (same state dict)."""
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            new = SplitBatchNorm(child.num_features, splits, eps=child.eps, momentum=child.momentum,
                                 affine=child.affine)
            new.load_state_dict(child.state_dict())
            new.requires_grad_(any(p.requires_grad for p in child.parameters()))  # a frozen EMA target stays frozen
            setattr(module, name, new.to(next(child.buffers()).device))
        else:
            convert_split_bn(child, splits)
    return module


def batch_norm_policy(model, sync, splits, batch_size=None):
    """Multi-process: SyncBN where the base method uses it (CUDA only; gloo CPU runs keep per-process BN); a
    --bn-splits above 1 does not apply and says so. One process: split-BN simulates `splits` devices (1 = plain BN);
    with batch_size given, a batch that does not split into equal chunks of 2 or more images is an error."""
    W = get_world()
    if W > 1:
        if splits > 1:
            print0(f"note: --bn-splits {splits} applies to one process only; here each of the {W} processes "
                   f"normalises its own {batch_size // W if batch_size else 'local'} images"
                   + (" (SyncBN on CUDA: all of them)" if sync else ""))
        if sync and torch.cuda.is_available():
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model
    if splits > 1 and batch_size is not None and (batch_size % splits or batch_size // splits < 2):
        ok = [d for d in range(2, splits + 1) if batch_size % d == 0 and batch_size // d >= 2]
        raise UserError(f"--batch-size {batch_size} does not split into --bn-splits {splits} equal chunks of 2 or more "
                        f"images; use --bn-splits {ok[-1] if ok else 1} or a --batch-size that is a multiple of "
                        f"{splits} (at least {2 * splits})")
    return convert_split_bn(model, splits) if splits > 1 else model


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio eta*|w|/(|g| + wd*|w|). Groups with lars_exclude=True
    (biases, BN) get neither adaptation nor weight decay. clip=True caps the local rate at 1 (solo-learn)."""

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.02, clip=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not g["lars_exclude"]:
                    wn, gn = p.norm(), d.norm()
                    d = d.add(p, alpha=g["weight_decay"])
                    trust = torch.where((wn > 0) & (gn > 0), g["eta"] * wn / (gn + g["weight_decay"] * wn),
                                        torch.ones_like(wn))
                    if g["clip"]:
                        trust = torch.clamp(trust / g["lr"], max=1.0) if g["lr"] > 0 else torch.ones_like(wn)
                    d = d * trust
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p)
                st["mu"].mul_(g["momentum"]).add_(d)
                p.add_(st["mu"], alpha=-g["lr"])


# ================================================================ 4. base frameworks
# Losses are pure functions (fp32); the modules expose their pieces (encoders, heads, EMA, queue)
# so a method can reuse them; forward(views, batch) returns (loss, logs).

def fp32(loss_fn):
    """Run a loss in fp32 even inside autocast, which would otherwise run its matmuls in bf16/fp16."""
    @functools.wraps(loss_fn)
    def wrapped(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return loss_fn(*args, **kwargs)
    return wrapped


@fp32
def nt_xent(z1, z2, temperature):
    """SimCLR (NT-Xent). z1, z2: B x D unit rows of this rank; negatives are gathered *with gradient*
    from every rank. Each of the 2B local anchors: -log exp(z_i.z_p/t) / sum_{j != i} exp(z_i.z_j/t)."""
    z = torch.cat([z1, z2]).float()                     # 2B x D
    B, r, W = z1.shape[0], get_rank(), get_world()
    allz = gather_with_grad(torch.stack([z1, z2]).float())   # (W*2) x B x D, rank-major
    allz = allz.view(W, 2, B, -1).reshape(W * 2 * B, -1)
    logits = z @ allz.T / temperature                   # 2B x 2BW
    base = r * 2 * B
    idx = torch.arange(2 * B, device=z.device)
    logits[idx, base + idx] = float("-inf")            # remove self-similarity
    pos = base + (idx + B) % (2 * B)                   # the other view of the same image
    return F.cross_entropy(logits, pos)


@fp32
def info_nce(q, k, queue, temperature):
    """MoCo InfoNCE: q, k B x D unit rows, queue K x D (detached); logits B x (1+K), positive at 0."""
    q, k, queue = q.float(), k.float(), queue.float()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@fp32
def neg_cosine(p, z):
    """-mean cos(p, sg(z)) (SimSiam Eq. 1; BYOL up to 2 - 2x)."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def byol_loss(p1, p2, z1, z2):
    """BYOL: sum over both directions of 2 - 2 cos, minus the constant 4: -2[cos(p1, z2) + cos(p2, z1)], min -4."""
    return 2 * (neg_cosine(p1, z2) + neg_cosine(p2, z1))


def simsiam_loss(p1, p2, z1, z2):
    """SimSiam Eq. 2: -(1/2)[cos(p1, sg z2) + cos(p2, sg z1)], min -1."""
    return 0.5 * (neg_cosine(p1, z2) + neg_cosine(p2, z1))


@torch.no_grad()
def ema_update(target, online, m):
    """theta_target <- m * theta_target + (1 - m) * theta_online, parameters only (buffers stay the target's)."""
    tp, op = list(target.parameters()), list(online.parameters())
    torch._foreach_lerp_(tp, [p.detach() for p in op], 1.0 - m)


class Queue(nn.Module):
    """MoCo's FIFO of K unit keys with an integer pointer; enqueue gathers keys from every rank first."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys):
        keys = gather_no_grad(keys.detach().float())
        idx = (self.ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[idx] = keys
        self.ptr.copy_((self.ptr + len(keys)) % len(self.queue))


@torch.no_grad()
def shuffled_forward(encoder, x):
    """Shuffle-BN (MoCo): the batch is permuted across all ranks before the key pass and un-permuted after,
    so a key never shares BN statistics with its query. On one device it permutes within the batch (with
    split-BN this is the official demo's stand-in). Warning: no gradient."""
    W, r, B = get_world(), get_rank(), x.shape[0]
    xs = gather_no_grad(x)
    perm = torch.randperm(len(xs), device=x.device)  # drawn where it is used: no host-to-device copy per step
    if W > 1:
        dist.broadcast(perm, 0)
    y = gather_no_grad(encoder(xs[perm][r * B:(r + 1) * B]))
    return y[torch.argsort(perm)][r * B:(r + 1) * B]


class Model(nn.Module):
    """The model of the training contract (module docstring); every method's model derives from it."""
    sync_bn = False   # True: SyncBatchNorm across GPUs (SimCLR, BYOL, SimSiam); False: per-GPU BN (MoCo's shuffle-BN)
    progress = 0.0    # step / total steps, set by fit before each step: schedules inside the model read it

    def forward(self, views, batch):
        """views: one normalised B x 3 x S x S tensor per view; batch: the ViewDataset batch. -> (loss, logs)."""
        raise NotImplementedError

    def param_groups(self):
        """The optimizer's groups; a group with fix_lr=True keeps its lr (SimSiam's predictor)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def after_step(self):
        """Runs after each optimizer step (EMA updates and enqueues that must follow backward)."""


class State:
    """Base of a method's state outside the model (the training contract, module docstring); checkpointed too."""

    def before_epoch(self, epoch):
        """Runs before epoch `epoch` (0-based) while no loader iterator exists: recompute boxes, neighbours."""

    def epoch_logs(self):
        """Values for this epoch's log record."""
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Encoder(nn.Module):
    """backbone followed by a projection head; normalize=True returns unit rows in fp32 (MoCo's q and k)."""

    def __init__(self, backbone, head, normalize=False):
        super().__init__()
        self.backbone, self.head, self.normalize = backbone, head, normalize

    def forward(self, x):
        z = self.head(self.backbone(x))
        return F.normalize(z.float(), dim=1) if self.normalize else z


def bn_splits_of(module):
    """The split count of the module's SplitBatchNorm layers (1 without split-BN)."""
    return next((m.splits for m in module.modules() if isinstance(m, SplitBatchNorm)), 1)


def encode_together(encoder, xs):
    """encoder over the views xs (each B x ...) in one pass; returns one output per view. Under split-BN with s
    splits the batch is arranged split-major, so each BN chunk holds both views of its B/s images, as one of s
    GPUs would (chunk k = images kB/s..(k+1)B/s - 1 of every view)."""
    n, B, s = len(xs), xs[0].shape[0], bn_splits_of(encoder)
    if s == 1 or B % s:
        return encoder(torch.cat(xs)).split(B)
    x = torch.stack(xs).unflatten(1, (s, B // s)).transpose(0, 1).flatten(0, 2)   # (s, n, B/s) order
    y = encoder(x).unflatten(0, (s, n, B // s)).transpose(0, 1).flatten(1, 2)     # n x B x ...
    return tuple(y)


def _head_dims(d, framework, imagenet):
    """Heads of ContrastiveCrop's code (models/, configs/small and configs/IN1K): small datasets (ResNet-18) and
    ImageNet (ResNet-50)."""
    return {"simclr": [d, d if not imagenet else 2048, 128], "mocov2": [d, d if not imagenet else 2048, 128],
            "byol": [d, 512 if not imagenet else 4096, 128 if not imagenet else 256],
            "simsiam": [d, d, d, d] if not imagenet else [d, 2048, 2048, 2048]}[framework]


class SimCLR(Model):
    """SimCLR: z = normalize(proj(f(v))), NT-Xent over 2B anchors with negatives from all ranks. Both views go through
    the network in one pass of 2B images, as the official code does, so BatchNorm sees both views together (with
    split-BN each chunk holds both views of its images, as one GPU would). Head: Linear-BN-ReLU-Linear (official
    code; head_bn=False is ContrastiveCrop's head). loss_scale: 1 (paper); ContrastiveCrop's code multiplies by
    t/0.07."""
    sync_bn = True

    def __init__(self, backbone, proj_dims, temperature=0.5, loss_scale=1.0, head_bn=True):
        super().__init__()
        self.encoder = Encoder(backbone, mlp(proj_dims, bn=head_bn))
        self.temperature, self.loss_scale = temperature, loss_scale

    @property
    def backbone(self):
        return self.encoder.backbone

    def forward(self, views, batch=None):
        z1, z2 = encode_together(self.encoder, views[:2])
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        return self.loss_scale * nt_xent(z1, z2, self.temperature), {}


class MoCoV2(Model):
    """MoCo-v2: query encoder (SGD), key encoder = EMA(query), queue of K keys, InfoNCE at temperature t.
    symmetric=True adds the swapped term (the demo's symmetric option). Shuffle-BN for keys. head_bn=True puts BN
    in the projection head's hidden layer (as SimCLR's and MoCo-v3's heads; MoCo-v2's has none)."""

    def __init__(self, backbone, proj_dims, queue_size=65536, temperature=0.2, momentum=0.999, symmetric=False,
                 head_bn=False):
        super().__init__()
        self.encoder_q = Encoder(backbone, mlp(proj_dims, bn=head_bn), normalize=True)   # q: unit rows
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)            # k: unit rows, EMA of q
        self.queue = Queue(queue_size, proj_dims[-1])
        self.temperature, self.momentum, self.symmetric = temperature, momentum, symmetric

    @property
    def backbone(self):
        return self.encoder_q.backbone

    def forward(self, views, batch=None):
        x1, x2 = views[:2]
        ema_update(self.encoder_k, self.encoder_q, self.momentum)
        negatives = self.queue.queue.clone()                        # the queue as it stood at step start
        q1, k2 = self.encoder_q(x1), shuffled_forward(self.encoder_k, x2)
        loss = info_nce(q1, k2, negatives, self.temperature)        # logits: B x (1+K)
        keys, logs = [k2], {}
        if self.symmetric:
            q2, k1 = self.encoder_q(x2), shuffled_forward(self.encoder_k, x1)
            swapped = info_nce(q2, k1, negatives, self.temperature)
            logs = {"loss_q1_k2": loss.detach(), "loss_q2_k1": swapped.detach()}
            loss = loss + swapped
            keys.append(k1)
        for k in keys:  # one gathered enqueue per view: the queue's layout is the same for any number of processes
            self.queue.enqueue(k)
        return loss, logs


class BYOL(Model):
    """BYOL: online proj+pred, target = EMA(online backbone+proj) with m (cosine-scheduled to 1 if cosine_ema)."""
    sync_bn = True

    def __init__(self, backbone, proj_dims, pred_hidden, momentum=0.996, cosine_ema=False):
        super().__init__()
        self.online = Encoder(backbone, mlp(proj_dims))
        self.predictor = mlp([proj_dims[-1], pred_hidden, proj_dims[-1]])
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.base_momentum, self.cosine_ema, self.progress = momentum, cosine_ema, 0.0

    @property
    def backbone(self):
        return self.online.backbone

    def momentum(self):
        if not self.cosine_ema:
            return self.base_momentum
        return 1 - (1 - self.base_momentum) * (math.cos(math.pi * self.progress) + 1) / 2

    def forward(self, views, batch=None):
        x1, x2 = views[:2]
        ema_update(self.target, self.online, self.momentum())
        p1, p2 = self.predictor(self.online(x1)), self.predictor(self.online(x2))
        with torch.no_grad():
            z1, z2 = self.target(x1), self.target(x2)
        return byol_loss(p1, p2, z1, z2), {}


class SimSiam(Model):
    """SimSiam: shared encoder, predictor h, stop-gradient; the predictor keeps a fixed lr (paper Sec. 4.2)."""
    sync_bn = True

    def __init__(self, backbone, proj_dims, pred_hidden):
        super().__init__()
        d = proj_dims[-1]
        self.encoder = Encoder(backbone, mlp(proj_dims, last_bn=True, last_affine=False))
        self.predictor = mlp([d, pred_hidden, d])

    @property
    def backbone(self):
        return self.encoder.backbone

    def param_groups(self):
        return [{"params": list(self.encoder.parameters())},
                {"params": list(self.predictor.parameters()), "fix_lr": True}]

    def forward(self, views, batch=None):
        z1, z2 = self.encoder(views[0]), self.encoder(views[1])
        return simsiam_loss(self.predictor(z1), self.predictor(z2), z1, z2), {}


# Each paper's (ImageNet) constants, and what small datasets (CIFAR-sized images) use instead: MoCo's official CIFAR
# demo (K 4096, m 0.99, t 0.1) and solo-learn's CIFAR BYOL (m 0.99 -> 1). A queue of 65,536 keys would exceed a
# 10k-50k-image dataset (an image's own older keys become its negatives), and a short run cannot wait for an EMA
# with a 1,000-step horizon (m 0.999).
PAPER = {"simclr": dict(temperature=0.5), "mocov2": dict(temperature=0.2, queue_size=65536, ema=0.999),
         "byol": dict(ema=0.996), "simsiam": {}}
# MoCo-v2's head gets BN on small data (our choice, measured: on cifar10-mini, 30 epochs, its kNN reached 40 % with
# it and stayed near random init, 34-35 %, without; README "Base frameworks").
SMALL_DATA = {**PAPER, "mocov2": dict(temperature=0.1, queue_size=4096, ema=0.99, head_bn=True), "byol": dict(ema=0.99)}


def build_framework(name, backbone, imagenet, args, contrastive_crop=False):
    """One of the four base frameworks with the heads of ContrastiveCrop's code (_head_dims) and each paper's
    constants. SimCLR follows its paper (loss x 1, BN in the head) unless contrastive_crop: then ContrastiveCrop's
    code (loss x t/0.07, no BN in the head). BYOL's target momentum rises from --ema to 1 on a cosine (BYOL Sec.
    3.2; ContrastiveCrop: fixed). Small data (not imagenet): the shorter EMA horizons and the sized queue of
    SMALL_DATA (MoCo's CIFAR demo, solo-learn's CIFAR BYOL) unless contrastive_crop keeps its table."""
    dims = _head_dims(backbone.out_dim, name, imagenet)
    c = SMALL_DATA[name] if not imagenet and not contrastive_crop else PAPER[name]
    t = args.temperature or c.get("temperature")
    if name == "simclr":
        if contrastive_crop:  # losses/NT_Xent_dist.py; the x7.1 at t 0.5 is a 7x larger step (see README)
            return SimCLR(backbone, dims, t, loss_scale=t / 0.07, head_bn=False)
        return SimCLR(backbone, dims, t)
    if name == "mocov2":
        return MoCoV2(backbone, dims, args.queue_size or capped_queue(args, c["queue_size"]), t, args.ema or c["ema"],
                      symmetric=getattr(args, "symmetric", False), head_bn=c.get("head_bn", False))
    if name == "byol":
        return BYOL(backbone, dims, 512 if not imagenet else 4096, args.ema or c["ema"],
                    cosine_ema=not contrastive_crop)
    if name == "simsiam":
        return SimSiam(backbone, dims, 128 if not imagenet else 512)
    raise UserError(f"unknown --framework '{name}'; choose simclr, mocov2, byol or simsiam")


# ================================================================ 5. training loop

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(precision, device):
    """auto: bf16 where the GPU supports it, else fp16 on CUDA (with a GradScaler), fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def make_optimizer(model, args):
    """SGD (momentum 0.9) or LARS over model.param_groups(); lr is per 256 images."""
    groups = model.param_groups()
    lr = args.lr * args.batch_size / 256
    if args.optimizer == "lars":  # biases and norms: no weight decay, no adaptation
        split = []
        for g in groups:
            rest = {k: v for k, v in g.items() if k != "params"}
            split.append({**rest, "params": [p for p in g["params"] if p.ndim > 1]})
            split.append({**rest, "params": [p for p in g["params"] if p.ndim <= 1], "lars_exclude": True,
                          "weight_decay": 0.0})
        opt = LARS([g for g in split if g["params"]], lr=lr, weight_decay=args.wd, eta=args.lars_eta,
                   clip=args.lars_clip)
    elif args.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=args.wd)
    else:
        raise UserError(f"unknown --optimizer '{args.optimizer}'; choose sgd or lars")
    for g in opt.param_groups:
        g["base_lr"] = lr
    return opt


def lr_factor(step, steps_per_epoch, epochs, warmup_epochs=0, floor=0.0, per_epoch=False):
    """Linear warm-up, then cosine from 1 to `floor`; per step, or once per epoch (per_epoch=True)."""
    e = step // steps_per_epoch if per_epoch else step / steps_per_epoch
    if e < warmup_epochs:
        return (step + 1) / (warmup_epochs * steps_per_epoch)
    t = (e - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def make_out(out):
    """Create the output folder (--out), or say in one line why it cannot be."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out} cannot be created ({e.strerror or type(e).__name__}: {e.filename or out}); "
                        "choose another --out")


def _lock_owner(path):
    """(pid, host) written in a lock file; None when it cannot be read (being written, or gone)."""
    try:
        with open(path) as f:
            pid, host = f.read().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


@contextlib.contextmanager
def run_lock(out):
    """out/lock, holding "pid host", created by rank 0 for the length of a run and removed at its end, errors
    included: a second run on the same --out is refused while the first lives. A lock whose process is gone (killed)
    is taken over, with a note."""
    path, mine = os.path.join(out, "lock"), f"{os.getpid()} {socket.gethostname()}\n"
    if is_main():
        for _ in range(3):
            try:
                with open(path, "x") as f:
                    f.write(mine)
                break
            except FileExistsError:
                owner = _lock_owner(path)
                if owner is None or owner[1] != socket.gethostname() or _alive(owner[0]):
                    who = f"process {owner[0]} on {owner[1]}" if owner else "another run"
                    raise UserError(f"{path}: {who} is training in this --out; wait for it to end or choose another "
                                    f"--out (delete {path} only if that run is gone)")
                print0(f"note: {path} was left by process {owner[0]}, which is gone; taking it over")
                if _lock_owner(path) == owner:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
            except OSError as e:
                raise UserError(f"--out {out} cannot be written ({e.strerror or type(e).__name__}: {path}); "
                                "choose another --out")
        else:
            raise UserError(f"{path} keeps coming back: another run is starting in this --out; choose another --out")
    try:
        yield path
    finally:
        if is_main() and _lock_owner(path) == (os.getpid(), socket.gethostname()):
            with contextlib.suppress(OSError):
                os.remove(path)


def fit(args, setup, data):
    """Train setup.model on data.train (the contract: module docstring): set up, resume from the checkpoint in
    args.out if there is one, then train_one_epoch and end_of_epoch for each epoch. Returns the summary. The run
    holds args.out/lock throughout (run_lock)."""
    make_out(args.out)
    with run_lock(args.out):
        return _fit(args, setup, data)


def _fit(args, setup, data):
    device, cuda = args.device, args.device.type == "cuda"
    model = batch_norm_policy(setup.model, setup.model.sync_bn, args.bn_splits, args.batch_size).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    dataset = ViewDataset(data.train, setup.views, args.seed)
    sampler = GlobalBatchSampler(len(dataset), args.batch_size, args.seed, get_rank(), get_world())
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, pin_memory=cuda,
                                         persistent_workers=args.workers > 0, generator=torch.Generator())
    dtype = resolve_precision(args.precision, device)
    r = SimpleNamespace(args=args, setup=setup, data=data, model=model, opt=make_optimizer(model, args), dtype=dtype,
                        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), dataset=dataset,
                        sampler=sampler, loader=loader, spe=sampler.batches_per_epoch(), step=0, history=[],
                        partial={}, images=data.train.images.to(device) if data.train.in_memory else None,
                        ckpt=os.path.join(args.out, "checkpoint.pth"), state_logs={}, stopped=False, train_time=0.0,
                        data_wait=[0.0])
    r.total = r.spe * args.epochs
    if broadcast_object(os.path.exists(r.ckpt)):  # rank 0 decides, so ranks cannot disagree on what they see
        resume(r)
    if is_main():
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items() if k != "device"}, f, indent=1, default=str)
        with open(os.path.join(args.out, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in r.history)
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")  # we mean: never sync buffers (queues, BN stats)
    r.net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if cuda else None, broadcast_buffers=False) if get_world() > 1 else model
    if args.compile:
        r.net = torch.compile(r.net)
    print0(f"{args.method} on {args.dataset}: {len(dataset)} images, {r.spe} steps/epoch x {args.epochs} epochs, "
           f"global batch {args.batch_size} on {get_world()} process(es), "
           f"effective lr {args.lr * args.batch_size / 256:.4g} "
           f"(= {args.lr} x {args.batch_size}/256), {args.optimizer}, precision {str(dtype)[6:]}, device {device}")
    r.knn_top1, start_step = (r.history[-1].get("knn_top1") if r.history else None), r.step
    for epoch in range(r.step // r.spe, args.epochs):
        if r.step == epoch * r.spe and setup.state is not None:
            setup.state.before_epoch(epoch)  # boxes, neighbours: recomputed before the loader iterator exists
        train_one_epoch(r, epoch)
        end_of_epoch(r, epoch)
        if r.stopped:
            break
    if r.stopped and args.knn_every and data.knn_val is not None and r.step < r.total:
        r.knn_top1 = knn_eval(model.backbone, data, args, setup.views.sizes[0])[0]
    if is_main():
        export_backbone(model.backbone, os.path.join(args.out, "backbone.pth"), method=args.method,
                        dataset=args.dataset, epoch=r.step / r.spe,
                        mean=list(data.mean), std=list(data.std))  # the input normalisation
        plot_curves(r.history, os.path.join(args.out, "curves.png"))
    return {"method": args.method, "dataset": args.dataset, "epochs": args.epochs, "steps": r.step,
            "train_time_s": round(r.train_time, 2), "data_wait_s": round(r.data_wait[0], 2),
            "images_per_s": round((r.step - start_step) * args.batch_size / max(r.train_time, 1e-9), 1),
            "knn_top1": r.knn_top1, **r.state_logs, "out": args.out}


def train_one_epoch(r, epoch):
    """One epoch of steps: views -> forward (the method's loss) -> backward -> optimizer step -> after_step (EMA,
    queue) -> log. Nothing waits for the device except the progress line every --log-every steps."""
    args, model, opt, device = r.args, r.model, r.opt, r.args.device
    skip = r.step - epoch * r.spe  # > 0 when resuming inside an epoch
    r.dataset.epoch.fill_(epoch)
    r.sampler.set_epoch(epoch, skip)
    r.sums = {k: torch.tensor(v, device=device) for k, v in r.partial.items()} if skip else {}
    r.partial, r.t_epoch, r.t_log, r.steps_log = {}, time.time(), time.time(), 0
    r.every = getattr(r, "every", None) or min(args.log_every, 2)  # the first line early: it estimates the epoch
    r.next_log = r.step + r.every
    r.bad = torch.zeros((), dtype=torch.bool, device=device)
    for batch in timed(r.loader, r.data_wait):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        factor = lr_factor(r.step, r.spe, args.epochs, args.warmup_epochs, r.setup.lr_floor, r.setup.lr_per_epoch)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * (1.0 if g.get("fix_lr") else factor)
        model.progress = r.step / r.total
        views = device_views(batch, r.images, r.data.mean, r.data.std, r.setup.views.sizes, device,
                             device.type == "cuda")
        with torch.autocast(device.type, dtype=r.dtype, enabled=r.dtype != torch.float32):
            loss, logs = r.net(views, batch)
        opt.zero_grad(set_to_none=True)
        r.scaler.scale(loss).backward()
        r.scaler.step(opt)
        r.scaler.update()
        model.after_step()
        r.bad |= ~torch.isfinite(loss.detach())
        for k, v in {"loss": loss, **logs}.items():
            r.sums[k] = r.sums.get(k, 0) + torch.as_tensor(v, device=device).detach().float()
        r.step, r.steps_log = r.step + 1, r.steps_log + 1
        r.stopped = bool(args.max_steps) and r.step >= args.max_steps
        if r.step >= r.next_log or r.step == r.total or r.stopped:
            log_progress(r, epoch)
        if r.stopped:
            break


def log_progress(r, epoch):
    """The progress line: mean losses of the epoch so far, lr, throughput, data-loader wait, time left. A line comes
    every --log-every steps, or sooner, so that one comes at least every 30 s (the interval follows the time per step
    averaged over the processes, so that all of them log, a collective, at the same steps)."""
    check_finite(r.bad, r.step, r.ckpt)
    dt = time.time() - r.t_log
    r.train_time += dt
    avg = mean_over_ranks({**r.sums, "time": torch.tensor(dt, device=r.args.device)})
    dt = avg.pop("time").item()
    avg = {k: v.item() / (r.step - epoch * r.spe) for k, v in avg.items()}
    ips = r.steps_log * r.args.batch_size / max(dt, 1e-9)
    eta = (r.total - r.step) * r.args.batch_size / max(ips, 1e-9)
    if not getattr(r, "estimated", False):
        r.estimated = True
        print0(f"first steps: {ips:.1f} img/s, about {fmt_time(r.spe * r.args.batch_size / max(ips, 1e-9))} an epoch")
    r.every = max(1, min(r.args.log_every, int(30 * r.steps_log / max(dt, 1e-9))))
    r.next_log = r.step + r.every
    print0(f"ep {epoch + 1}/{r.args.epochs} step {r.step}/{r.total} " + " ".join(f"{k} {v:.4f}" for k, v in avg.items())
           + f" lr {r.opt.param_groups[0]['lr']:.4g} img/s {ips:.1f} data wait "
           f"{100 * r.data_wait[0] / max(r.train_time, 1e-9):.0f}% eta {fmt_time(eta)}")
    r.t_log, r.steps_log = time.time(), 0


def end_of_epoch(r, epoch):
    """After an epoch: its log record (losses, method logs, kNN), log.jsonl, the checkpoint. An epoch cut short by
    --max-steps only saves its partial sums, so that the resumed epoch logs the same."""
    args, data = r.args, r.data
    if r.stopped and r.step - epoch * r.spe < r.spe:
        r.partial = {k: v.item() for k, v in r.sums.items()}
        save_checkpoint(r)
        return
    check_finite(r.bad, r.step, r.ckpt)
    r.train_time += time.time() - r.t_log
    rec = {"epoch": epoch + 1, "step": r.step, **{k: v.item() / r.spe for k, v in mean_over_ranks(r.sums).items()},
           "lr": r.opt.param_groups[0]["lr"], "epoch_time_s": round(time.time() - r.t_epoch, 2)}
    if r.setup.state is not None:
        r.state_logs = r.setup.state.epoch_logs()
        rec.update(r.state_logs)
    if args.knn_every and data.knn_val is not None and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
        r.knn_top1 = rec["knn_top1"] = knn_eval(r.model.backbone, data, args, r.setup.views.sizes[0])[0]
        print0(f"ep {epoch + 1}: kNN top-1 {r.knn_top1:.2f}")
    r.history.append(rec)
    if is_main():
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
    save_checkpoint(r)


def save_checkpoint(r):
    """The whole training state under its names: restore() reads back what save() wrote, nothing hand-listed."""
    save(r.ckpt, model=r.model, optimizer=r.opt, scaler=r.scaler, state=r.setup.state, step=r.step, history=r.history,
         partial=r.partial, rng=all_rng_states(), steps_per_epoch=r.spe, method=r.args.method,
         args={k: v for k, v in vars(r.args).items() if k != "device"})


def resume(r):
    ck = load_checkpoint(r.ckpt, r.args, r.args.method, r.spe)
    restore(ck, model=r.model, optimizer=r.opt, state=r.setup.state)
    if r.scaler.is_enabled() and ck["scaler"]:
        r.scaler.load_state_dict(ck["scaler"])
    elif r.scaler.is_enabled() or ck["scaler"]:
        print0(f"note: {r.ckpt} was saved at another --precision; the fp16 loss scale starts afresh")
    r.step, r.history, r.partial = ck["step"], ck["history"], ck["partial"]
    set_rng_state(ck["rng"], r.args.seed)
    print0(f"resumed from {r.ckpt} at epoch {r.step // r.spe} step {r.step}")


def timed(iterable, wait):
    """Yield from iterable, adding the seconds spent waiting for each item to wait[0] (the data-loader wait)."""
    it = iter(iterable)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        wait[0] += time.perf_counter() - t
        yield item


def broadcast_object(obj):
    """Rank 0's value of obj, on every rank."""
    if get_world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def mean_over_ranks(sums):
    """Average logged sums over processes (log intervals only: this synchronises)."""
    if get_world() == 1 or not sums:
        return sums
    keys = sorted(sums)
    t = torch.stack([sums[k] for k in keys]) / get_world()
    dist.all_reduce(t)
    return dict(zip(keys, t))


def check_finite(bad, step, ckpt_path):
    if get_world() > 1:
        bad = bad.clone().float()
        dist.all_reduce(bad)
    if bool(bad):
        raise UserError(f"the loss became NaN or inf by step {step}; training stopped and the last good checkpoint "
                        f"({ckpt_path}, if any) is kept; lower --lr or use --precision fp32")


def finish(summary):
    """The last stdout line of every script: one JSON object."""
    if is_main():
        print(json.dumps(summary), flush=True)


# ================================================================ 6. evaluation (kNN)

class EvalDataset(torch.utils.data.Dataset):
    """Un-augmented images. view: "eval" = Resize(size/0.875) + CenterCrop(size) (evaluation); "squash" =
    Resize((size, size)) (ContrastiveCrop's frame for boxes); "centre" = CenterCrop(size) of the image as it is
    (CLIM's clustering view)."""

    def __init__(self, source, size, indices, view="eval"):
        self.source, self.size, self.indices = source, size, indices
        tv = torchvision.transforms
        resize = {"eval": [tv.Resize(round(size / 0.875)), tv.CenterCrop(size)], "squash": [tv.Resize((size, size))],
                  "centre": [tv.CenterCrop(size)]}[view]
        self.tf = tv.Compose([*resize, tv.PILToTensor()])

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.tf(self.source.pil(self.indices[i]))


def eval_autocast(device):
    """bf16 autocast on CUDA where supported, else none: a frozen forward needs no GradScaler, and fp16 may overflow."""
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32)


def shard_rows(n, rank=None):
    """Rank `rank`'s contiguous share of n rows (sizes differ by at most one, so no rank is empty when n >= world)."""
    r, W = get_rank() if rank is None else rank, get_world()
    return slice(r * n // W, (r + 1) * n // W)


@torch.no_grad()
def extract_features(backbone, source, size, mean, std, device, batch_size=256, workers=0, shard=False,
                     dtype=torch.float32, fn=None, view="eval"):
    """The one pass over a dataset: fn(backbone, x) (default: pooled features) of every image of `source`, the
    network in eval mode (bf16 autocast on CUDA) with its BatchNorm statistics averaged over ranks, stored as
    `dtype` on `device`. x: normalised, EvalDataset's `view` of files; in-memory images (all of one size) are
    centre-cropped if larger and view="centre", else resized to size x size if they differ.

    Each rank embeds its rows shard_rows(n). shard=True returns that shard alone (its labels are
    source.labels[shard_rows(n)]); else every rank gets all n rows in index order, which for ImageNet's train set
    and ResNet-50 is 10.5 GB in fp32: fine for small sets and for clustering, not for the kNN monitor. fp16 storage
    (|x| < 65504, 11-bit mantissa) halves that and is ample for pooled ResNet features."""
    with rank_mean_bn_stats(backbone):
        return _sharded_pass(backbone, source, size, mean, std, device, batch_size, workers, shard, dtype,
                             fn or (lambda net, x: net(x)), view)


def _sharded_pass(backbone, source, size, mean, std, device, batch_size, workers, shard, dtype, fn, view):
    was = backbone.training
    backbone.eval()
    n, W, rows = len(source), get_world(), shard_rows(len(source))
    per = math.ceil(n / W)
    idx = [*range(rows.start, rows.stop)] + [n - 1] * (per - (rows.stop - rows.start))  # equal sizes for all_gather
    mean_t, std_t = _channel_constant(tuple(mean), device), _channel_constant(tuple(std), device)
    cuda = device.type == "cuda"
    if source.in_memory:
        batches = (source.images[idx[i:i + batch_size]] for i in range(0, len(idx), batch_size))
    else:
        batches = torch.utils.data.DataLoader(EvalDataset(source, size, idx, view), batch_size=batch_size,
                                              num_workers=workers, pin_memory=cuda)
    out, i = None, 0
    for x in batches:
        x = x.to(device, non_blocking=True).float() / 255.0
        if source.in_memory and view == "centre" and min(x.shape[-2:]) > size:
            top, left = round((x.shape[-2] - size) / 2), round((x.shape[-1] - size) / 2)  # as CenterCrop
            x = x[..., top:top + size, left:left + size]
        if x.shape[-1] != size and source.in_memory:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = (x - mean_t) / std_t
        with eval_autocast(device):
            f = fn(backbone, x.contiguous(memory_format=torch.channels_last) if cuda else x)
        if out is None:  # written batch by batch: no list of batches and no concatenated copy
            out = torch.empty(per, f.shape[1], dtype=dtype, device=device)
        out[i:i + len(f)] = f
        i += len(f)
    backbone.train(was)
    if shard:
        return out[:rows.stop - rows.start]
    if W == 1:
        return out
    parts = [torch.empty_like(out) for _ in range(W)]
    dist.all_gather(parts, out)
    return torch.cat([p[:s.stop - s.start] for p, s in zip(parts, (shard_rows(n, r) for r in range(W)))])


@torch.no_grad()
def knn_classify(bank_f, bank_y, query_f, num_classes, k=20, T=0.07, query_chunk=1024, bank_chunk=8192):
    """Weighted kNN (Wu et al. 2018): cosine similarity, the top-k neighbours vote with exp(sim / T).
    -> Q x 5 classes, best first, the same on every rank.

    The memory bank is sharded: bank_f (N_r x D, any float dtype; fp16 in knn_eval) and bank_y are this rank's rows
    (all rows in one process); query_f (Q x D) is the same on every rank. Each rank keeps the top-k of its shard;
    the k x world candidates are all-gathered and their top-k votes, so the answer is the one of a single process
    holding the whole bank. Chunks are normalised and multiplied in fp32 (fp16 matmul is slow or missing on CPU),
    so a similarity block is query_chunk x bank_chunk. Missing neighbours (k > N) are -inf: weight exp(-inf) = 0.

    Peak memory per rank of the monitor on ImageNet (ResNet-50, D 2048, 8 ranks, chunks 1024 x 8192, k 20), in MB:
    bank shard 160,146 x 2048 fp16 656; queries 50,000 x 2048 fp16 205 (435 while gathered); in the loop a bank chunk
    in fp32 and its normalised copy 134, a query chunk 17, similarities 34, the running top-k 12; the merge 132 more.
    Peak 1,091 (bank + query gather) plus one batch of backbone activations while embedding; the gathered fp32 bank
    alone was 10,495. Compute: 50,000 x 160,146 x 2048 x 2 = 33 TFLOP per rank."""
    dev, Q = query_f.device, len(query_f)
    bank_y = bank_y.to(dev)
    top_s = torch.full((Q, k), -math.inf, device=dev)          # Q x k: best similarities so far
    top_y = torch.zeros(Q, k, dtype=torch.long, device=dev)    # Q x k: their labels (0 under -inf: weight 0)
    for j in range(0, len(bank_f), bank_chunk):
        b = F.normalize(bank_f[j:j + bank_chunk].float(), dim=1)                                 # Bb x D
        for q in (slice(i, i + query_chunk) for i in range(0, Q, query_chunk)):
            sim = F.normalize(query_f[q].float(), dim=1) @ b.T                                       # Bq x Bb
            s, nn_idx = sim.topk(min(k, len(b)), dim=1)
            s, y = torch.cat([top_s[q], s], 1), torch.cat([top_y[q], bank_y[j + nn_idx]], 1)        # Bq x (k + k)
            top_s[q], pick = s.topk(k, dim=1)
            top_y[q] = y.gather(1, pick)
    if get_world() > 1:  # the top-k of every rank's top-k: Q x (world k) candidates
        s, y = (gather_no_grad(t).view(get_world(), Q, k).transpose(0, 1).reshape(Q, -1) for t in (top_s, top_y))
        top_s, pick = s.topk(k, dim=1)
        top_y = y.gather(1, pick)
    ranked = []
    for q in (slice(i, i + query_chunk) for i in range(0, Q, query_chunk)):
        votes = torch.zeros(len(top_s[q]), num_classes, device=dev)                                # Bq x C
        votes.scatter_add_(1, top_y[q], (top_s[q] / T).exp())
        ranked.append(votes.argsort(dim=1, descending=True, stable=True)[:, :5])  # stable: ties by class index
    return torch.cat(ranked)


def topk_accuracy(ranked, y):
    """Top-1 and top-5 accuracy (%) of ranked predictions (Q x 5) against labels y (Q)."""
    hit = ranked[:, :5] == y.to(ranked.device).view(-1, 1)                                         # Q x 5
    return 100.0 * hit[:, 0].float().mean().item(), 100.0 * hit.any(1).float().mean().item()


@contextlib.contextmanager
def rank_mean_bn_stats(module):
    """Inside the block, every BatchNorm running mean/var of module holds its mean over ranks; restored after.
    Models without SyncBN keep BN statistics per process (each saw only its share of the data); their mean is
    what split-BN keeps on one process (the running averages are linear in the batch statistics), so an
    evaluation with several processes equals the one-process split-BN one."""
    stats = [b for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var"))]
    if get_world() == 1 or not stats:
        yield module
        return
    saved = [b.clone() for b in stats]
    flat = torch.cat([b.flatten() for b in stats])
    dist.all_reduce(flat)
    for b, v in zip(stats, (flat / get_world()).split([b.numel() for b in stats])):
        b.copy_(v.view_as(b))
    try:
        yield module
    finally:
        for b, v in zip(stats, saved):
            b.copy_(v)


def knn_eval(backbone, data, args, size, k=20, T=0.07):
    """kNN top-1/top-5 of the backbone (BN statistics averaged over ranks): memory = data.knn_train (a fp16 shard per
    rank), queries = data.knn_val."""
    dev, tr, te = args.device, data.knn_train, data.knn_val
    bank = extract_features(backbone, tr, size, data.mean, data.std, dev, workers=args.workers, shard=True,
                            dtype=torch.float16)
    queries = extract_features(backbone, te, size, data.mean, data.std, dev, workers=args.workers, dtype=torch.float16)
    C = int(max(tr.labels.max(), te.labels.max())) + 1
    return topk_accuracy(knn_classify(bank, tr.labels[shard_rows(len(tr))], queries, C, k, T), te.labels)


# ================================================================ 7. checkpoints and export

def save_atomic(obj, path):
    """Write to a temporary file, then rename: a run killed during a save keeps the previous file intact. A write
    that fails (disk full, quota, I/O error) removes the temporary file, keeps the previous one and says so."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as RuntimeError
        if isinstance(e, RuntimeError) and "write" not in str(e).lower():
            raise
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        kept = " (the previous one is kept)" if os.path.exists(path) else ""
        raise UserError(f"writing {path} failed{kept}: " + ("the disk is full; free some space or choose another "
                        "--out" if full else f"{getattr(e, 'strerror', None) or e}; check the disk and --out"))


def rng_state():
    """This process's generators; CUDA's is the current device's only, so it fits any number of GPUs."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if cuda else None}


def set_rng_state(states, seed):
    """Restore every rank's generators. A rank the checkpoint has no state for (more processes than when it was
    saved) is re-seeded from (seed, rank, step count) instead, and says so; views never depend on these generators."""
    rank = get_rank()
    if rank < len(states):
        s = states[rank]
        torch.set_rng_state(s["torch"])
        np.random.set_state(s["numpy"])
        random.setstate(s["python"])
    else:
        s = {"cuda": None}
        seed_everything(seed * 1000 + rank + len(states))
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda and isinstance(s["cuda"], torch.Tensor):
        torch.cuda.set_rng_state(s["cuda"])
    elif cuda or rank >= len(states):
        print(f"note: rank {rank} had no saved {'CUDA ' if cuda else ''}random state in the checkpoint "
              f"({len(states)} process(es) saved it); its generators were re-seeded", flush=True)


def _strip(sd):
    return {k.replace("_orig_mod.", "").replace("module.", ""): v for k, v in sd.items()}


def all_rng_states():
    """Every rank's generators (collective), saved so that a resumed run draws what it would have drawn."""
    if get_world() == 1:
        return [rng_state()]
    states = [None] * get_world()
    dist.all_gather_object(states, rng_state())
    return states


def save(path, **objects):
    """Checkpoint: each named object's state_dict() (model, optimizer, method state; None stays None) or plain value,
    written atomically by rank 0. Collective: every rank calls it."""
    state = {k: _strip(v.state_dict()) if isinstance(v, nn.Module) else v.state_dict() if hasattr(v, "state_dict")
             else v for k, v in objects.items()}
    if is_main():
        save_atomic(state, path)
    if get_world() > 1:
        dist.barrier()


def restore(ck, **objects):
    """Load each named object (None: skipped) from a checkpoint that save() wrote."""
    for k, v in objects.items():
        if v is not None:
            v.load_state_dict(ck[k])


# The flags that may change when a run resumes: where and how it runs (processes, BatchNorm chunks standing in for
# them, workers, device, precision: the fp16 loss scale then starts afresh), what it prints, where its files are
# (--data may move), and when it stops (--max-steps). Every other argument, derived ones included (args after each
# script's parse, build and resolve_data), must equal the checkpoint's; --epochs too, as the schedules span it.
RESUME_MAY_CHANGE = {"out", "data", "download", "gpus", "device_type", "bn_splits", "workers", "precision", "compile",
                     "log_every", "knn_every", "show_views", "max_steps", "ckpt",
                     "resume_keys"}  # resume_keys: saved by older versions, not a flag


def load_checkpoint(path, args, method, spe):
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        saved = ck["args"]
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); delete it or choose another --out")
    if ck.get("method") != method:
        raise UserError(f"{path} was made by method {ck.get('method')}, this run is {method}; choose another --out")
    now = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE and k != "device"}
    diff = [k for k in sorted((now.keys() | saved.keys()) - RESUME_MAY_CHANGE - {"device"})
            if saved.get(k, "unset") != now.get(k, "unset")]
    if diff:
        what = ", ".join(f"--{k.replace('_', '-')} {saved.get(k, 'unset')} (now {now.get(k, 'unset')})" for k in diff)
        raise UserError(f"{path} was made with {what}; resume with the same flags, or start afresh with another "
                        f"--out (or delete {path})")
    if ck["steps_per_epoch"] != spe:
        raise UserError(f"{path} has {ck['steps_per_epoch']} steps per epoch, this run {spe}; the dataset changed")
    return ck


def export_backbone(backbone, path, **meta):
    """backbone.pth: a plain torchvision ResNet state dict (fc removed, or the RF MLP in fc) plus metadata."""
    save_atomic({"state_dict": _strip(backbone.state_dict()), **backbone.arch_meta, **meta}, path)


def load_backbone(path, arch=None):
    """Rebuild a backbone from backbone.pth, or from a run folder (its backbone.pth, written whenever a run ends)."""
    if os.path.isdir(path):
        path = os.path.join(path, "backbone.pth")
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; pass a run folder or its backbone.pth")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path} is not a backbone.pth written by this repository ({type(e).__name__})")
    if isinstance(ck, dict) and "model" in ck and "state_dict" not in ck:
        raise UserError(f"{path} is a training checkpoint (the whole model); pass its run folder "
                        f"{os.path.dirname(path) or '.'} or the backbone.pth beside it")
    if not isinstance(ck, dict) or "state_dict" not in ck:
        raise UserError(f"{path} is not a backbone.pth written by this repository")
    sd = ck["state_dict"]
    arch = arch or ck.get("arch")
    net = build_backbone(arch, ck.get("stem", "imagenet"), rf_layout=ck.get("rf_layout"),
                         rf_mlp=ck.get("rf_mlp", False))
    try:
        net.load_state_dict(sd)
    except RuntimeError:
        raise UserError(f"{path} holds a {ck.get('arch')} backbone (stem {ck.get('stem')}), which does not match "
                        f"--arch {arch}; drop --arch or pass the matching one")
    return net, ck


# ================================================================ 8. plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(history, path):
    """curves.png: training loss and kNN top-1 against the epoch."""
    if not history:
        return
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = [h["epoch"] for h in history]
    ax[0].plot(ep, [h["loss"] for h in history], "o-")
    ax[0].set(xlabel="epoch", ylabel="training loss")
    kn = [(h["epoch"], h["knn_top1"]) for h in history if h.get("knn_top1") is not None]
    if kn:
        ax[1].plot(*zip(*kn), "o-", color="C1")
    ax[1].set(xlabel="epoch", ylabel="kNN top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def denormalize(x, mean, std):
    """Normalised C x H x W view -> H x W x 3 array in [0, 1] for display."""
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (x.detach().float().cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def save_figure_grid(rows, path, title=None, tile=2.0):
    """rows: lists of panels dict(img=H x W x 3, title=str, boxes=[(top, left, h, w, colour, label)], dashed=bool).
    Panels with 'draw' (a callable taking a matplotlib axis) are drawn by the caller."""
    plt = _plt()
    from matplotlib.patches import Rectangle
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(tile * ncol, tile * len(rows) + (0.4 if title else 0)),
                             squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax, panel in zip(ax_row, row + [None] * (ncol - len(row))):
            ax.axis("off")
            if panel is None:
                continue
            if "draw" in panel:
                ax.axis("on")
                panel["draw"](ax)
            else:
                ax.imshow(panel["img"], interpolation="nearest")
            for t, l, h, w, colour, label in panel.get("boxes", []):
                ax.add_patch(Rectangle((l - 0.5, t - 0.5), w, h, fill=False, ec=colour, lw=1.5,
                                       ls="--" if colour == "white" else "-"))
                if label:
                    ax.text(l, t, label, color=colour, fontsize=6, va="bottom")
            ax.set_title(panel.get("title", ""), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show_views(args, data, views, path, n=4, title=None):
    """views.png: per image the source with every view's box, then the views (a Views) as the model sees them."""
    ds = ViewDataset(data.train, views, args.seed)
    idx = random.Random(args.seed).sample(range(len(ds)), min(n, len(ds)))
    items = [ds[i] for i in idx]
    batch = torch.utils.data.default_collate(items)
    images = data.train.images if data.train.in_memory else None
    sizes = views.sizes
    views = device_views(batch, images, data.mean, data.std, sizes, torch.device("cpu"))
    colours = ["lime", "red", "orange", "deepskyblue", "magenta", "yellow"]
    rows = []
    for r, (i, it) in enumerate(zip(idx, items)):
        boxes = [(*it["boxes"][k].tolist(), colours[k % 6], f"v{k}") for k in range(len(sizes)) if it["src"][k] == i]
        src = np.asarray(data.train.pil(i)) / 255.0
        rows.append([{"img": src, "title": f"image {i}", "boxes": boxes}]
                    + [{"img": denormalize(views[k][r], data.mean, data.std), "title": f"v{k} {sizes[k]}px"}
                       for k in range(len(sizes))])
    save_figure_grid(rows, path, title)


# ================================================================ 9. command line

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no prefix matching: --epoch is an error, not a shorthand for --epochs."""

    def __init__(self, *a, allow_abbrev=False, **k):
        super().__init__(*a, allow_abbrev=allow_abbrev, **k)

    def error(self, message):  # one line, no usage dump
        fail(f"{message} (see --help)")


def base_parser(description):
    """The flags every script shares. Flags left at None are filled from the method's DEFAULTS."""
    p = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)} (synthetic needs no files)")
    a("--data", default="./data", help="dataset root (ImageFolder root with train/ [val/] for folder/imagenet)")
    a("--download", action="store_true", help="let torchvision fetch cifar10/cifar100/stl10 into --data")
    a("--class-list", default=None, help="file with one ImageNet wnid per line: selects those classes (imagenet100)")
    a("--arch", default=None, help=f"backbone: {', '.join(ARCHS)} (default: the dataset's row of DEFAULTS)")
    a("--stem", default=None, choices=["auto", "cifar", "imagenet"],
      help="auto: CIFAR stem (3x3 conv, no max-pool) for 32-64 px data; imagenet on 32 px is ~12x cheaper for CPU runs")
    a("--subset", type=int, default=0,
      help="train on N training images only (quick runs, tests): the first N; from an ImageFolder, N evenly spaced "
           "over its class-sorted files so that every class appears")
    a("--epochs", type=int, default=None, help="training epochs (schedules span them even with --max-steps)")
    a("--batch-size", type=int, default=None, help="global batch size, split over processes")
    a("--lr", type=float, default=None, help="learning rate per 256 images; the effective rate is lr x batch/256")
    a("--wd", type=float, default=None, help="weight decay")
    a("--optimizer", default=None, choices=["sgd", "lars"], help="sgd (momentum 0.9) or lars")
    a("--warmup-epochs", type=float, default=None, help="linear lr warm-up epochs before the cosine decay")
    a("--lars-eta", type=float, default=0.02, help="LARS trust coefficient (0.02 with clipping, solo-learn)")
    a("--lars-clip", type=int, default=1, help="1: clip the LARS local rate at the global lr")
    a("--bn-splits", type=int, default=None,
      help="one process only: BatchNorm over this many equal chunks (2+ images each) of the batch, simulating that "
           "many GPUs (MoCo: 8); with several processes it does not apply, and a note says so")
    a("--gpus", type=int, default=1,
      help="GPUs on this node (spawns one process each); 0 forces the CPU; ignored under torchrun")
    a("--device", dest="device_type", default="auto", choices=["auto", "cpu"],
      help="auto: CUDA when present; cpu: stay on the CPU, and with --gpus N spawn N CPU processes over gloo "
           "(the GPU launch path, on the CPU)")
    a("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="auto: bf16 on GPUs that have it, else fp16; fp32 on CPU")
    a("--compile", action="store_true", help="torch.compile the model (CUDA; slower start, faster steps)")
    a("--workers", type=int, default=None,
      help="data-loader workers per process (default: 0 for in-memory data, 8 otherwise)")
    a("--seed", type=int, default=0, help="seed of every random choice (views are seeded by seed, epoch and index)")
    a("--out", default=None, help="output folder (default runs/<method>-<dataset>); a checkpoint there is resumed")
    a("--knn-every", type=int, default=None,
      help="kNN monitor (k=20, T=0.07) every N epochs and at the end (default 1; 10 on ImageNet); 0 turns it off")
    a("--log-every", type=int, default=50, help="progress line every N steps")
    a("--max-steps", type=int, default=0,
      help="stop after N optimizer steps (schedule unchanged) and save; rerun to resume")
    a("--show-views", action="store_true", help="write views.png (the views of 4 images) and exit without training")
    a("--baseline", action="store_true", help="train the method's base framework with everything else equal")
    return p


# The range of every numeric flag of every script, checked in one place (check_ranges, called by parse) for the flags
# a script has. An interval's end may name another flag (the warm-up ends before --epochs); a list flag (--local-scale
# MIN MAX) has each value checked; None ("auto", filled later) is skipped; text after "; " says why.
FLAG_RANGES = {
    # base_parser: every script
    "subset": "[0, inf)", "epochs": "[1, inf)", "lr": "(0, inf)", "wd": "[0, inf)", "warmup_epochs": "[0, epochs)",
    "batch_size": "[2, inf); one image cannot form a negative pair", "lars_eta": "(0, inf)", "lars_clip": "[0, 1]",
    "bn_splits": "[1, inf)", "gpus": "[0, inf)", "workers": "[0, inf)", "seed": "[0, 4294967295]",
    "knn_every": "[0, inf)", "log_every": "[1, inf)", "max_steps": "[0, inf)",
    # losses, queues and target encoders (common.py, contrastive_crop.py, leoclr.py, clim.py; logo.py's moco_*)
    "temperature": "(0, inf)", "moco_t": "(0, inf)", "queue_size": "[1, inf)", "moco_k": "[1, inf)",
    "ema": "[0, 1)", "moco_m": "[0, 1)", "tau_base": "[0, 1)", "proj_dim": "[1, inf)", "moco_dim": "[1, inf)",
    # crops: area fractions and sizes in px
    "crop_min_scale": "(0, 1]", "crop_scale": "(0, 1]", "global_scale": "(0, 1]", "local_scale": "(0, 1]",
    "global_size": "[1, inf)", "local_size": "[1, inf)",
    # logo.py
    "ll_weight": "[0, inf)", "aff_hidden": "[1, inf)", "aff_lr": "(0, inf)", "aff_momentum": "[0, 1)",
    "aff_wd": "[0, inf)", "aff_noise": "[0, inf)",
    # co_ssl.py
    "local_weight": "[0, 1]", "local_grid": "[0, inf)", "pred_hidden": "[1, inf)", "prototypes": "[2, inf)",
    "student_temp": "(0, inf)", "teacher_temp": "(0, inf)", "center_momentum": "[0, 1)",
    # contrastive_crop.py: Beta(alpha, alpha), heatmap threshold, fractions of --epochs
    "alpha": "(0, inf)", "box_thresh": "[0, 1)", "loc_warmup": "[0, 1]", "loc_interval": "[0, 1]",
    # clim.py
    "clusters": "[1, inf)", "cluster_every": "[1, inf)", "cluster_start": "[0, inf)", "kmeans_iters": "[0, inf)",
    "pca_dim": "[1, inf)", "mix_prob": "[0, 1]", "mix_alpha": "(0, inf)", "resolutions": "[8, inf)",
    # linear_eval.py
    "finetune_epochs": "[1, inf)", "finetune_lr": "(0, inf)", "size": "[1, inf)", "robust_images": "[0, inf)",
    "knn_k": "[1, inf)",
}


def check_ranges(p, args, given=None):
    """Fail (one line) on the first numeric flag outside its FLAG_RANGES interval: the flag, its value, the range.
    An end that names another flag binds only a value the user gave (in `given`, default: all): a method's default
    warm-up still applies to a run shorter than it, as before."""
    flags = {a.dest: next((o for o in a.option_strings if o.startswith("--")), a.dest) for a in p._actions}
    for name, spec in FLAG_RANGES.items():
        value = getattr(args, name, None)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue  # absent, None, or a word ("auto")
        interval, _, why = spec.partition("; ")
        lo, hi = (e.strip() for e in interval[1:-1].split(","))
        relative = hi != "inf" and hi.isidentifier()  # the end is another flag's value
        if relative and given is not None and name not in given:
            hi, interval = "inf", interval[:-1] + ")"
        top = math.inf if hi == "inf" else float(getattr(args, hi)) if relative else float(hi)
        if all(math.isfinite(v) and (v >= float(lo) if interval[0] == "[" else v > float(lo))
               and (v <= top if interval[-1] == "]" else v < top) for v in values):
            continue
        if hi == "inf":
            allowed = f"{'>=' if interval[0] == '[' else '>'} {lo}"
        elif relative:
            allowed = f"in {interval[0]}{lo}, {flags.get(hi, hi)} {getattr(args, hi)}{interval[-1]}"
        else:
            allowed = f"in {interval}"
        fail(f"{flags.get(name, '--' + name)} {' '.join(map(str, values))} is out of range: it must be {allowed}"
             + (f" ({why})" if why else ""))


def parse(p, defaults, method, argv=None):
    """Parse, then fill every flag left at None from DEFAULTS[dataset] (synthetic: its documented row; folder: a
    placeholder row until resolve_folder has seen the images).
    Every numeric flag is then checked against its range (FLAG_RANGES)."""
    args = p.parse_args(argv)
    if args.dataset not in DATASETS:
        fail(f"unknown dataset '{args.dataset}'; choose one of {', '.join(DATASETS)}")
    given = {k for k, v in vars(args).items() if v is not None}
    row = defaults[args.dataset]
    if args.dataset == "folder":  # the row is chosen from the images once they are seen (resolve_data)
        args.folder_rows = {like: {k: v for k, v in defaults[like].items() if k not in given} for like in FOLDER_LIKE}
    for k, v in row.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    knn = 10 if args.dataset in ("imagenet", "imagenet100") else 1  # a kNN pass over ImageNet costs ~1/3 epoch
    for k, v in {"stem": "auto", "optimizer": "sgd", "warmup_epochs": 0, "bn_splits": 1, "wd": 1e-4,
                 "knn_every": knn}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    check_ranges(p, args, given)
    args.method = f"{method}-baseline" if args.baseline else method  # --baseline: its own folder and name
    args.out = args.out or os.path.join("runs", f"{args.method}-{args.dataset}")
    return args


def default_workers(in_memory, args):
    """Data-loader workers per process: none for in-memory data (cropped on the device), else the cores this process
    may use divided by the processes of this node."""
    if in_memory:
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or max(1, getattr(args, "gpus", 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: none
    return max(1, cores // local)


# --dataset folder takes the DEFAULTS row of the dataset its images resemble: by side when they are small and alike
# (kept in memory), else ImageNet-100's row below 300,000 images and ImageNet's above.
FOLDER_LIKE = {"cifar10": 32, "tinyimagenet": 64, "stl10": 96, "imagenet100": None, "imagenet": None}
QUEUE_FLAGS = ("queue_size", "moco_k")  # the key queues of the MoCo-style methods (logo.py: moco_k)


def folder_like(source):
    """The dataset whose DEFAULTS row a folder of these images takes (FOLDER_LIKE)."""
    side = image_side(source)
    if side is not None and side <= FOLDER_LIKE["stl10"]:
        return next(like for like, s in FOLDER_LIKE.items() if s is not None and side <= s)
    return "imagenet100" if len(source) < 300_000 else "imagenet"


def resolve_folder(args, source):
    """--dataset folder: the flags the user left unset take the row of the dataset the images resemble, the key
    queue stays below the number of images (a larger one would hold keys of the same image from earlier epochs),
    and the choice is printed."""
    rows = args.__dict__.pop("folder_rows", None)
    if rows is None:  # resolved already (resume, or a second call)
        return
    like, n = folder_like(source), len(source)
    for k, v in rows[like].items():
        setattr(args, k, v)
    step = 2 * args.batch_size  # a multiple of every method's keys per step (LeOCLR enqueues two views' keys)
    args.queue_cap = max(step, (n - args.batch_size) // step * step)
    for k in QUEUE_FLAGS:
        q, cap = getattr(args, k, None), n - args.batch_size
        if q is None or q <= cap:
            continue
        if k not in rows[like]:
            raise UserError(f"--{k.replace('_', '-')} {q} holds more keys than the folder's {n} images minus one "
                            f"batch ({cap}): keys of an image would meet that image again; pass at most {max(cap, 0)}")
        setattr(args, k, args.queue_cap)
    return like


def capped_queue(args, default):
    """A framework's default queue length, within a folder's cap (resolve_folder): the largest multiple of twice the
    batch that leaves one batch of images out of the queue (twice the batch when the folder is smaller than that)."""
    return min(default, getattr(args, "queue_cap", None) or default)


def resolve_data(args, data):
    """Defaults that depend on the loaded data: a folder's row, the stem (auto) and the number of workers."""
    like = resolve_folder(args, data.train) if args.dataset == "folder" else None
    side = image_side(data.train)
    if args.stem == "auto":
        args.stem = "cifar" if side is not None and side <= 64 else "imagenet"
    if like:
        shown = ", ".join(f"{k} {getattr(args, k)}" for k in ("arch", "stem", "epochs", "batch_size", "lr",
                                                               *QUEUE_FLAGS) if getattr(args, k, None) is not None)
        how = "kept in memory" if data.train.in_memory else "median shorter side"
        print0(f"folder: {len(data.train)} images, {side} px ({how}): {like}'s row for the flags not given ({shown}), "
               f"{view_size(args, data)} px views; pass flags to change any of it")
    if args.workers is None:
        args.workers = default_workers(data.train.in_memory, args)
    return side


Setup = namedtuple("Setup", "model views state lr_floor lr_per_epoch", defaults=(None, 0.0, False))
Setup.__doc__ = """What a method's build(args, data) returns: the training contract (module docstring)."""


def main(parse, build, show=None, norm_stats=None, argv=None):
    """A method script from end to end: parse its flags, launch the processes, and in each: seed, load the data
    (normalised with norm_stats[dataset], or norm_stats(args), where the method's official code has its own
    constants), build, then train (fit)
    or only draw (--show-views). The last stdout line is the summary as JSON."""
    launch(functools.partial(_run, build=build, show=show, norm_stats=norm_stats or {}), parse(argv))


def _run(args, build, show, norm_stats):
    seed_everything(args.seed)
    data = with_stats(load_data(args), norm_stats(args) if callable(norm_stats) else norm_stats.get(args.dataset))
    resolve_data(args, data)
    setup = build(args, data)
    if args.baseline:
        print0(f"--baseline: {args.framework}, the base framework of {args.method[:-9]}, with everything else equal")
    summary = draw(args, data, setup, show) if args.show_views else fit(args, setup, data)
    finish({**summary, "framework": args.framework})


def draw(args, data, setup, show=None):
    """--show-views: views.png and the method's own figures, without training. show(args, data, setup, path) -> dict
    draws them (every rank calls it: a method may need a collective pass first); without it, show_views."""
    make_out(args.out)
    path = os.path.join(args.out, "views.png")
    out = {"method": args.method, "dataset": args.dataset, "views": path}
    if show is not None:
        out.update(show(args, data, setup, path) or {})
    elif is_main():
        show_views(args, data, setup.views, path, title=f"{args.method}: its {len(setup.views.sizes)} views")
    return out


# ---- common.py as a script: pretrain one of the four base frameworks

SMALL = dict(arch="resnet18", stem="auto", epochs=500, batch_size=512, lr=0.25, wd=1e-4, optimizer="sgd")
LARGE = dict(arch="resnet50", stem="imagenet", epochs=100, batch_size=256, lr=0.03, wd=1e-4, optimizer="sgd")
# Heads, constants and optimisation rows: ContrastiveCrop's code (configs/small/cifar10/*_rcrop.py, configs/IN1K,
# models/). Views and recipes: each framework's own paper (MIN_SCALE, framework_recipes); contrastive_crop.py uses
# ContrastiveCrop's single recipe instead. Stem: auto (the CIFAR stem for 32-64 px images).
DEFAULTS = {
    **{d: SMALL for d in ["cifar10", "cifar100", "stl10", "tinyimagenet", "synthetic"]},
    **{d: LARGE for d in ["imagenet100", "imagenet", "folder"]}}
LARGE_OVERRIDES = {"simclr": dict(batch_size=512, lr=0.025), "byol": dict(batch_size=512, lr=0.05),
                   "simsiam": dict(batch_size=512, lr=0.05), "mocov2": {}}
MIN_SCALE = {"simclr": 0.08, "mocov2": 0.2, "byol": 0.08, "simsiam": 0.2}  # each paper's RandomResizedCrop scale
# Normalisation where a framework's official code covers the dataset with other constants than load_data's:
# MoCo's colab/moco_cifar10_demo.ipynb. SimCLR's code feeds unnormalised [0, 1] pixels; BYOL's and SimSiam's
# cover ImageNet only (ImageNet constants, the default).
BASE_NORM_STATS = {"mocov2": {"cifar10": CIFAR_COMMON}}


def base_norm_stats(args):
    return BASE_NORM_STATS.get(args.framework, {}).get(args.dataset)


def view_size(args, data):
    """Training view side: native for small datasets (32/64/96); a folder: native when its images are alike and small,
    else the side of the dataset they resemble (folder_like); 224 for ImageNet-like data."""
    if args.dataset == "folder" and not data.train.in_memory:
        return FOLDER_LIKE[folder_like(data.train)] or 224
    return DATASETS[args.dataset]["size"] or native_size(data.train) or 224


def two_views(scale):
    """The classic pair: two independent RandomResizedCrop boxes with flip p=0.5."""
    return RandomResizedCrops(2, scale)


def framework_recipes(name, size):
    """Each paper's photometric recipe; below 96 px no blur (BLUR_FROM), and SimCLR's colour strength 0.5 (its
    CIFAR-10 setting, paper appendix B.9) instead of 1.0."""
    blur = blurs("base", size)
    if name == "byol":
        return list(byol_recipes(blur))
    return [simclr_recipe(blur, 1.0 if blur else 0.5) if name == "simclr" else mocov2_recipe(blur)] * 2


def parse_base(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--framework", default="mocov2", choices=["simclr", "mocov2", "byol", "simsiam"],
                   help="base framework")
    p.add_argument("--temperature", type=float, default=None, help="SimCLR 0.5, MoCo-v2 0.2 (small data: 0.1)")
    p.add_argument("--queue-size", type=int, default=None,
                   help="MoCo-v2 queue length K (65536; small data: 4096); a multiple of the batch")
    p.add_argument("--ema", type=float, default=None,
                   help="EMA momentum (MoCo 0.999, BYOL 0.996 rising to 1; small data: 0.99 each)")
    p.add_argument("--crop-min-scale", type=float, default=None,
                   help="RandomResizedCrop min area (default: the framework's paper)")
    p.add_argument("--symmetric", action="store_true",
                   help="MoCo-v2: add the swapped loss term (official CIFAR demo option)")
    argv = sys.argv[1:] if argv is None else argv
    pre = p.parse_known_args(argv)[0]
    if pre.baseline:
        fail("--baseline trains a method's base framework; common.py trains one already (--framework)")
    fw = pre.framework
    defaults = {d: {**row, **(LARGE_OVERRIDES[fw] if row is LARGE else {}), "bn_splits": 8 if fw == "mocov2" else 1}
                for d, row in DEFAULTS.items()}
    return parse(p, defaults, fw, argv)


def build_base(args, data):
    """A base framework with its paper's views (two RandomResizedCrops) and recipes."""
    size = view_size(args, data)
    scale = (args.crop_min_scale or MIN_SCALE[args.framework], 1.0)
    imagenet = args.dataset in ("imagenet", "imagenet100") or size >= 160
    # Residual branches start at zero as in each official code: SimSiam's in every block; BYOL's (haiku's ResNet v1)
    # only in bottleneck blocks, i.e. ResNet-50's, not ResNet-18's basic blocks.
    zero = args.framework == "simsiam" or (args.framework == "byol" and args.arch == "resnet50")
    backbone = build_backbone(args.arch, args.stem, zero_init_residual=zero)
    model = build_framework(args.framework, backbone, imagenet, args)
    if args.framework == "mocov2" and len(model.queue.queue) % args.batch_size:
        raise UserError(f"--queue-size {len(model.queue.queue)} must be a multiple of --batch-size {args.batch_size}")
    return Setup(model, Views(two_views(scale), [size, size], framework_recipes(args.framework, size)),
                 lr_floor=0.1 if not imagenet else 0.0, lr_per_epoch=True)


def main_base(argv=None):
    """common.py as a script: pretrain one base framework."""
    main(parse_base, build_base, norm_stats=base_norm_stats, argv=argv)


if __name__ == "__main__":
    main_base()
