"""tests/benchmark.py: where the time of a training step goes (a script; pytest does not collect it).

For each method (the four base frameworks of common.py and every method file present) it measures, on the
same views and the same device:
  step   images/s of a full training step: forward (the method's loss) + backward + optimizer step + after_step
  bare   images/s of the bare backbone forward + backward over the same views (no heads, no extra passes)
  data   images/s of the data path: loader (boxes, PIL crops) + device crop/flip/photometric/normalise
and prints step/bare (the method's cost over the views it uses) and data/step (>1: the data path keeps up).

    python tests/benchmark.py                                        # CPU-sized default: 32 px, ImageNet stem
    python tests/benchmark.py --methods mocov2 leoclr --batch-size 256 --stem cifar --steps 20   # GPU, CIFAR-size
    python tests/benchmark.py --dataset folder --data DIR --methods logo --batch-size 128           # ImageNet-size
Every method file exposes parse(argv) -> args and build(args, data) -> common.Setup; that is all this uses.
"""
import argparse, importlib, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import common  # noqa: E402

FRAMEWORKS = ["simclr", "mocov2", "byol", "simsiam"]
METHODS = ["logo", "co_ssl", "contrastive_crop", "leoclr", "clim"]
QUEUE_METHODS = {"mocov2", "logo", "contrastive_crop", "leoclr", "clim"}  # take --queue-size (a multiple of the batch)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name, extra, device, steps, warmup):
    if name in FRAMEWORKS:
        args, build = common.parse_base(["--framework", name] + extra), common.build_base
    else:
        mod = importlib.import_module(name)
        args, build = mod.parse(extra), mod.build
    args.device = device
    common.seed_everything(args.seed)
    data = common.load_data(args)
    common.resolve_data(args, data)
    setup = build(args, data)
    model = common.batch_norm_policy(setup.model, False, args.bn_splits).to(device)
    opt = common.make_optimizer(model, args)
    kw = setup.fit_kwargs
    ds = common.ViewDataset(data.train, setup.views_fn, setup.sizes, setup.recipes, args.seed,
                            kw.get("sources_fn"), kw.get("extra_fn"))
    sampler = common.GlobalBatchSampler(len(ds), args.batch_size, args.seed)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    images = data.train.images.to(device) if data.train.in_memory else None
    dtype = common.resolve_precision(args.precision, device)
    cl = device.type == "cuda"
    if cl:
        model = model.to(memory_format=torch.channels_last)

    def batches():
        while True:
            for b in loader:
                yield b

    it = batches()
    n = warmup + steps
    prepared = []
    t0 = None
    for i in range(n):  # data path
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        b = next(it)
        prepared.append((common.device_views(b, images, data.mean, data.std, setup.sizes, device, cl), b))
    sync(device)
    data_ips = steps * args.batch_size / (time.perf_counter() - t0)

    def timed(step_fn):
        for i in range(n):
            if i == warmup:
                sync(device)
                t = time.perf_counter()
            step_fn(*prepared[i])
        sync(device)
        return steps * args.batch_size / (time.perf_counter() - t)

    def full_step(views, b):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = model(views, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(model, "after_step"):
            model.after_step()

    backbone = common.build_backbone(args.arch, args.stem).to(device)
    if cl:
        backbone = backbone.to(memory_format=torch.channels_last)
    bopt = torch.optim.SGD(backbone.parameters(), lr=1e-3, momentum=0.9)

    def bare_step(views, b):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = sum(backbone(v).float().mean() for v in views)
        bopt.zero_grad(set_to_none=True)
        loss.backward()
        bopt.step()

    step_ips = timed(full_step)
    bare_ips = timed(bare_step)
    return dict(method=name, views="+".join(str(s) for s in setup.sizes), data=data_ips, step=step_ips, bare=bare_ips,
                step_over_bare=bare_ips / step_ips, data_over_step=data_ips / step_ips)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None, help="default: the four frameworks and every method file present")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data", default="./data")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stem", default="imagenet", help="imagenet on 32 px is the cheap CPU setting; cifar for real CIFAR cost")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--gpus", type=int, default=1)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and a.gpus > 0 else "cpu")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    methods = a.methods or FRAMEWORKS + [m for m in METHODS if os.path.exists(os.path.join(here, f"{m}.py"))]
    extra = ["--dataset", a.dataset, "--data", a.data, "--arch", a.arch, "--stem", a.stem, "--batch-size", str(a.batch_size),
             "--workers", str(a.workers), "--precision", a.precision, "--subset", str(max(a.batch_size * (a.steps + a.warmup), 256)),
             "--out", "/tmp/benchmark-unused"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; dataset {a.dataset}, arch {a.arch} ({a.stem} stem), "
          f"batch {a.batch_size}, {a.steps} timed steps after {a.warmup} warm-up")
    rows = []
    for m in methods:
        flags = extra + (["--queue-size", str(a.batch_size * 64)] if m in QUEUE_METHODS else [])
        try:
            rows.append(bench(m, flags, device, a.steps, a.warmup))
        except (Exception, SystemExit) as e:  # one broken method should not hide the others' numbers
            print(f"{m}: failed: {type(e).__name__}: {e}")
    print("\n| method | views (px) | data img/s | step img/s | bare backbone img/s | step time / bare | data / step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['views']} | {r['data']:.0f} | {r['step']:.0f} | {r['bare']:.0f} | "
              f"{r['step_over_bare']:.2f} | {r['data_over_step']:.2f} |")


if __name__ == "__main__":
    main()
