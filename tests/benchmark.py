"""tests/benchmark.py: where the time of a training step goes (a script; pytest does not collect it).

For each method (the four base frameworks of common.py and every method file present) it measures, on the
same views and the same device:
  step   images/s of a full training step: forward (the method's loss) + backward + optimizer step + after_step
  bare   images/s of the bare backbone forward + backward over the same views (no heads, no extra passes)
  data   images/s of the data path: loader (boxes, decoded crops) + device crop/flip/photometric/normalise
and prints step/bare (the method's cost over the views it uses) and data/step (>1: the data path keeps up).
With --data-path it instead times one worker core decoding and cropping each method's views from JPEG files
(ImageNet-size: 224 px views), the former all-PIL path against torchvision decode_jpeg + tensor crops.

    python tests/benchmark.py                                        # CPU-sized default: 32 px, ImageNet stem
    python tests/benchmark.py --methods mocov2 leoclr --batch-size 256 --stem cifar --steps 20   # GPU, CIFAR-size
    python tests/benchmark.py --dataset folder --data DIR --methods logo --batch-size 128           # ImageNet-size
    python tests/benchmark.py --data-path                     # samples/s per worker core on 200 generated 500x375 JPEGs
    python tests/benchmark.py --data-path --data DIR --methods mocov2   # ... on an ImageFolder of your JPEGs
    python tests/benchmark.py --results --epochs 30          # the results table: every arm trained and evaluated
With --results it trains, each through its public command line and in its own folder under --out, a random-init
backbone, the four base frameworks, and every method with its --baseline on an ImageFolder (default
../shared/data/cifar10-mini: ResNet-18, ImageNet stem, batch 256, E epochs, the rest each script's defaults), then
judges every arm alike with linear_eval.py (kNN k=20 and k=200 on the folder's val split, and the linear probe on
precomputed features), and writes results.md and assets/results.png. Killed halfway, it continues where it stopped:
a finished arm is skipped, a half-trained one resumes from its checkpoint. Each finished arm's row (with the commit
it ran on) is also kept in assets/results.json, so a table made over several sessions survives the loss of --out.
Every method file exposes parse(argv) -> args and build(args, data) -> common.Setup; that is all this uses.
"""
import argparse, importlib, json, os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402

FRAMEWORKS = ["simclr", "mocov2", "byol", "simsiam"]
METHODS = ["logo", "co_ssl", "contrastive_crop", "leoclr", "clim"]
QUEUE_METHODS = {"mocov2", "logo", "contrastive_crop", "leoclr", "clim"}  # take --queue-size (a multiple of the batch)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(name, extra, device):
    """A method's args, data and Setup, built as its own script builds them."""
    if name in FRAMEWORKS:
        args, build = common.parse_base(["--framework", name] + extra), common.build_base
        norm = common.BASE_NORM_STATS.get(name, {})
    else:
        mod = importlib.import_module(name)
        args, build, norm = mod.parse(extra), mod.build, getattr(mod, "NORM_STATS", {})
    args.device = device
    common.seed_everything(args.seed)
    data = common.with_stats(common.load_data(args), norm.get(args.dataset))  # as the script's run()
    common.resolve_data(args, data)
    return args, data, build(args, data)


def bench(name, extra, device, steps, warmup):
    args, data, setup = load(name, extra, device)
    model = common.batch_norm_policy(setup.model, False, args.bn_splits).to(device)
    opt = common.make_optimizer(model, args)
    ds = common.ViewDataset(data.train, setup.views, args.seed)
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
        prepared.append((common.device_views(b, images, data.mean, data.std, setup.views.sizes, device, cl), b))
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
    return dict(method=name, views="+".join(str(s) for s in setup.views.sizes), data=data_ips, step=step_ips,
                bare=bare_ips, step_over_bare=bare_ips / step_ips, data_over_step=data_ips / step_ips)


def write_jpegs(root, n=200):
    """n ImageNet-like files in an ImageFolder: 500x375 JPEGs at quality 90, ~90 kB each (ImageNet's mean is ~110 kB),
    common.synthetic_images upscaled plus texture at several scales, so the decoder works as hard as on photos."""
    g = torch.Generator().manual_seed(0)
    for start in range(0, n, 20):  # in chunks: 200 float images of 500x375 would take 450 MB
        imgs, labels = common.synthetic_images(min(20, n - start), size=96, offset=start)
        x = F.interpolate(imgs.float(), size=(375, 500), mode="bilinear")
        for k in (1, 2, 4, 16, 64):
            noise = torch.randn(len(x), 3, 375 // k + 2, 500 // k + 2, generator=g)
            x += 14 * F.interpolate(noise, size=(375, 500), mode="bicubic")
        for i, (im, label) in enumerate(zip(x.clamp(0, 255).round().to(torch.uint8), labels.tolist())):
            os.makedirs(os.path.join(root, f"class{label}"), exist_ok=True)
            path = os.path.join(root, f"class{label}", f"{start + i:04d}.jpg")
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(path, quality=90)


def data_path(name, extra, items, block=20):
    """samples/s of dataset[i] (every view decoded, cropped, resized and flipped) per second of this process's CPU
    time (one thread): the former all-PIL path and the tensor path on the same boxes. CPU time, and alternating
    blocks, so that other processes on a shared machine slow both alike and barely move the figures."""
    args, data, setup = load(name, extra, torch.device("cpu"))
    if data.train.in_memory:
        raise common.UserError(f"{args.data} holds small images, kept in memory and cropped on the device; "
                               "--data-path needs large ones (e.g. ImageNet JPEGs)")
    paths = [common.ViewDataset(data.train, setup.views, args.seed, pil=pil) for pil in (True, False)]
    n = len(data.train)
    for ds in paths:  # warm-up: every file in the page cache, both paths run once
        for i in range(n):
            ds[i]
    seconds, starts = [0.0, 0.0], range(0, items, block)
    for start in starts:
        for k, ds in enumerate(paths):
            ds.epoch.fill_(start // n)  # each pass over the files draws new boxes
            t = time.process_time()
            for i in range(start, start + block):
                ds[i % n]
            seconds[k] += time.process_time() - t
    done = len(starts) * block
    return dict(method=name, views="+".join(str(s) for s in setup.views.sizes), pil=done / seconds[0],
                torch=done / seconds[1])


def data_path_table(methods, a):
    torch.set_num_threads(1)  # one DataLoader worker's share: what --workers multiplies
    with tempfile.TemporaryDirectory() as tmp:
        root = a.data
        if root is None:
            root = tmp
            write_jpegs(root)
        extra = ["--dataset", "folder", "--data", root, "--arch", a.arch, "--subset", "200", "--out", tmp]
        sizes = [os.path.getsize(f) for f in common.load_data(common.parse_base(extra)).train.files]
        print(f"samples per second of CPU time on {torch.get_num_threads()} thread ({os.cpu_count()} cores here); "
              f"torch {torch.__version__}, "
              f"torchvision {torchvision.__version__}; {len(sizes)} JPEGs under {a.data or 'a temporary folder'}, "
              f"mean {sum(sizes) / len(sizes) / 1e3:.0f} kB; {a.items} samples per path and method, alternating")
        rows = []
        for m in methods:
            try:
                rows.append(data_path(m, extra, a.items))
            except (Exception, SystemExit) as e:  # one broken method should not hide the others' numbers
                print(f"{m}: failed: {type(e).__name__}: {e}")
    print("\n| method | views (px) | PIL samples/s | decode_jpeg + tensor samples/s | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['views']} | {r['pil']:.0f} | {r['torch']:.0f} | {r['torch'] / r['pil']:.2f} |")


# ---- --results: every arm trained and judged alike (a script; each arm is its own process through the CLI)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_FLAGS = ["--arch", "resnet18", "--stem", "imagenet", "--batch-size", "256"]


def result_arms(methods=METHODS):
    """(name, script, flags) of every arm: random init, the four frameworks, each method and its --baseline."""
    arms = [("random-init", None, [])]
    arms += [(fw, "common.py", ["--framework", fw]) for fw in FRAMEWORKS]
    for m in methods:
        arms += [(m, f"{m}.py", []), (f"{m}-baseline", f"{m}.py", ["--baseline"])]
    return arms


def run_json(cmd, log, on_line=None):
    """Run a command, its output appended to log as it comes (progress can be followed there; on_line() after each
    line); -> the JSON of its last stdout line."""
    last = ""
    with open(log, "a") as f:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for line in p.stdout:
            f.write(line)
            f.flush()
            last = line if line.startswith("{") else last
            if on_line is not None:
                on_line()
        p.wait()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}); see {log}")
    return json.loads(last)


def run_arm(arm, a, run=run_json):
    """Train (or resume) and evaluate one arm; its result.json marks it done, so a rerun skips it. The training
    time so far is saved beside it at every output line, so a kill during training loses at most the time since
    the last line, and one during evaluation none of it."""
    name, script, flags = arm
    out = os.path.join(a.out, name)
    done = os.path.join(out, "result.json")
    if os.path.exists(done):
        return json.load(open(done))
    os.makedirs(out, exist_ok=True)
    log, data = os.path.join(out, "output.log"), ["--dataset", "folder", "--data", a.data]
    partial = done + ".partial"
    before, t = (json.load(open(partial))["wall_s"] if os.path.exists(partial) else 0.0), time.time()
    wall = lambda: before + time.time() - t

    def save(value=None):  # through a temporary file: a kill while writing leaves the previous value
        with open(partial + ".tmp", "w") as f:
            json.dump({"wall_s": wall() if value is None else value}, f)
        os.replace(partial + ".tmp", partial)
    if script is None:  # the random-init backbone every method starts from
        torch.manual_seed(a.seed)
        net = common.build_backbone(RESULT_FLAGS[1], RESULT_FLAGS[3])
        common.export_backbone(net, os.path.join(out, "backbone.pth"), method="random-init", epoch=0)
        train = {"images_per_s": None}
    else:
        train = run([sys.executable, os.path.join(ROOT, script), *data, *RESULT_FLAGS, "--epochs", str(a.epochs),
                     "--seed", str(a.seed), *flags, *a.extra, "--out", out, "--gpus", str(a.gpus)], log, save)
    train_s = wall()
    save(train_s)  # the training time, kept if the evaluation is killed
    ev = run([sys.executable, os.path.join(ROOT, "linear_eval.py"), out, *data, "--precompute", "--knn-k", "20",
              "200", "--gpus", str(a.gpus), "--out", out], log)["runs"][out]
    result = {"arm": name, "command": " ".join([script or "random-init", *flags]), "images_per_s":
              train.get("images_per_s"), "wall_s": round(train_s, 1), "knn20": ev["knn_top1"],
              "knn200": ev["knn_top1_k200"], "linear": ev["linear_top1"]}
    json.dump(result, open(done, "w"))
    os.remove(partial)
    return result


def results_table(rows):
    """Markdown: one row per arm; the gain over random init and, for a method, over its own --baseline."""
    base = {r["arm"]: r for r in rows}
    rand = base.get("random-init", {}).get("knn20")
    head = ["arm", "img/s", "training time", "kNN k=20", "kNN k=200", "linear", "kNN k=20 vs random init",
            "vs its baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, sign="": "-" if v is None else f"{v:{sign}.1f}"
    for r in rows:
        ref = base.get(f"{r['arm']}-baseline")
        vs_rand = None if rand is None or r["arm"] == "random-init" else r["knn20"] - rand
        vs_base = None if ref is None else r["knn20"] - ref["knn20"]
        lines.append(f"| {r['arm']} | {fmt(r['images_per_s'])} | {common.fmt_time(r['wall_s'])} | {fmt(r['knn20'])} | "
                     f"{fmt(r['knn200'])} | {fmt(r['linear'])} | {fmt(vs_rand, '+')} | {fmt(vs_base, '+')} |")
    return "\n".join(lines) + "\n"


def results_plot(rows, path):
    """One bar per arm (kNN k=20), the random-init level as a line, each method's baseline as a tick on its bar."""
    plt = common._plt()
    base = {r["arm"]: r for r in rows}
    arms = [r for r in rows if r["arm"] != "random-init"]
    fig, ax = plt.subplots(figsize=(0.55 * len(arms) + 2, 3.2))
    ax.bar(range(len(arms)), [r["knn20"] for r in arms], color=["#999" if r["arm"].endswith("-baseline") else "#36c"
                                                                for r in arms])
    for i, r in enumerate(arms):
        ref = base.get(f"{r['arm']}-baseline")
        if ref is not None:
            ax.plot([i - 0.4, i + 0.4], [ref["knn20"]] * 2, color="k", lw=1.5)
    if "random-init" in base:
        ax.axhline(base["random-init"]["knn20"], color="r", ls="--", lw=1, label="random init")
        ax.legend(fontsize=7, loc="lower left")
    ax.set_xticks(range(len(arms)), [r["arm"] for r in arms], rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="kNN top-1 (%), k=20", title="grey: --baseline arms; black tick: a method's own baseline")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def code_version():
    """The commit an arm runs on, with "+" when a tracked Python file differs from it."""
    git = lambda *c: subprocess.run(["git", "-C", ROOT, *c], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+" if git("status", "--porcelain", "-uno", "--", "*.py") else "")


def read_record(path):
    """arm -> row of every finished arm in the record file (none when it does not exist yet)."""
    if not path or not os.path.exists(path):
        return {}
    return {r["arm"]: r for r in json.load(open(path))["rows"]}


def write_record(path, row):
    """Add (or replace) one arm's row in the record, through a temporary file: a kill leaves the previous record."""
    rows = {**read_record(path), row["arm"]: row}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"rows": list(rows.values())}, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def results(a):
    """Every arm in turn. A finished arm's row goes into the record file (assets/results.json, committed with the
    table), so the table survives the loss of --out: an arm recorded for the same job (data, epochs, seed, extra
    flags) is not run again, and the commit it ran on stays in its row."""
    a.data = a.data or os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-mini")
    a.out = a.out or os.path.join(ROOT, "runs", "results")
    job = {"data": os.path.basename(os.path.normpath(a.data)), "epochs": a.epochs, "seed": a.seed, "extra": a.extra}
    arms = [arm for arm in result_arms() if a.methods is None or arm[0] in a.methods]
    rows = []
    for arm in arms:
        recorded = read_record(a.record).get(arm[0])
        if recorded is not None and recorded.get("job") == job:
            print(f"{arm[0]}: recorded in {a.record} (commit {recorded['commit']}), not run again", flush=True)
            rows.append(recorded)
            continue
        print(f"{arm[0]}: training {a.epochs} epochs and evaluating, output in {os.path.join(a.out, arm[0])}",
              flush=True)
        version, date = code_version(), time.strftime("%Y-%m-%d")  # at the start: the code this arm runs
        try:
            rows.append(run_arm(arm, a))
        except RuntimeError as e:  # one failing arm should not hide the others' numbers
            print(f"{arm[0]}: {e}", flush=True)
            continue
        if a.record:
            rows[-1] = {**rows[-1], "job": job, "commit": version, "date": date}
            write_record(a.record, rows[-1])
        print(f"{arm[0]}: kNN k=20 {rows[-1]['knn20']:.2f}, linear {rows[-1]['linear']:.2f}", flush=True)
    table = results_table(rows)
    os.makedirs(a.out, exist_ok=True)  # every arm recorded: nothing else made it
    open(os.path.join(a.out, "results.md"), "w").write(table)
    results_plot(rows, a.plot)
    print(table + f"\nwrote {os.path.join(a.out, 'results.md')} and {a.plot}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None,
                   help="default: the four frameworks and every method file present")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data", default=None, help="dataset root (default ./data); with --data-path an ImageFolder of "
                   "large JPEGs (default: 200 generated 500x375 ones)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stem", default="imagenet",
                   help="imagenet on 32 px is the cheap CPU setting; cifar for real CIFAR cost")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--data-path", action="store_true", help="instead: samples/s per worker core of each method's "
                   "views decoded and cropped from JPEG files, PIL against decode_jpeg + tensor crops")
    p.add_argument("--items", type=int, default=400, help="--data-path: samples timed per path and method")
    p.add_argument("--results", action="store_true", help="instead: train and judge every arm (results table)")
    p.add_argument("--epochs", type=int, default=30, help="--results: training epochs of every arm")
    p.add_argument("--out", default=None, help="--results: the arms' folders (default runs/results)")
    p.add_argument("--plot", default=os.path.join(ROOT, "assets", "results.png"), help="--results: the bar chart")
    p.add_argument("--seed", type=int, default=0, help="--results: the seed of every arm")
    p.add_argument("--record", default=os.path.join(ROOT, "assets", "results.json"),
                   help="--results: every finished arm's row, kept across runs ('' for none)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="--results: flags passed to every training command (last)")
    a = p.parse_args()
    if a.results:
        return results(a)
    device = torch.device("cuda" if torch.cuda.is_available() and a.gpus > 0 else "cpu")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    methods = a.methods or FRAMEWORKS + [m for m in METHODS if os.path.exists(os.path.join(here, f"{m}.py"))]
    if a.data_path:
        return data_path_table(methods, a)
    extra = ["--dataset", a.dataset, "--data", a.data or "./data", "--arch", a.arch, "--stem", a.stem,
             "--batch-size", str(a.batch_size),
             "--workers", str(a.workers), "--precision", a.precision,
             "--subset", str(max(a.batch_size * (a.steps + a.warmup), 256)),
             "--out", "/tmp/benchmark-unused"]
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
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
