"""tests/gpu_check.py: the full-scale GPU path in one command, for whoever has one GPU for a few minutes.

A script (pytest collects test_*.py only). In this process, with --gpus 1, it runs every entry point: the four base
frameworks of common.py, the five method scripts and linear_eval.py on the MoCo-v2 checkpoint, ResNet-50, bf16, on a
temporary ImageFolder of JPEGs of 256-500 px (so the real file path decodes and crops them), and on DIR as well with
--data DIR. Under torch.cuda.set_sync_debug_mode("warn") it counts host syncs between training steps (--log-every is
huge, so no step in the timed window logs) and prints one table, each number next to its target:

    python tests/gpu_check.py                         # ~7 min on one H100-class GPU
    python tests/gpu_check.py --only mocov2 logo      # some entry points
    python tests/gpu_check.py --data /data/imagenet   # also on a real ImageFolder root (train/, val/)
    python tests/gpu_check.py --cpu-smoke             # 2 steps of each on the CPU, tiny settings: tests this script

Steps are delimited by calls of common.device_views (once per training step in fit and in linear_eval); the first
--warmup steps (torch.compile, cuDNN autotuning, workers starting) are neither timed nor counted.
"""
import argparse, contextlib, importlib, io, json, os, random, shutil, sys, tempfile, time, warnings
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402

FRAMEWORKS = ["simclr", "mocov2", "byol", "simsiam"]
METHODS = ["logo", "co_ssl", "contrastive_crop", "leoclr", "clim"]
TARGET_IPS = {"mocov2": 2500}  # ResNet-50, two views, bf16, per H100-class GPU
SYNC_MESSAGE = "synchroniz"    # torch's warning: "called a synchronizing CUDA operation"


def make_folder(root, n_train, n_val, sides, unique=256):
    """ImageFolder root/train, root/val of synthetic images (10 classes) upscaled to random sides in `sides` px:
    `unique` JPEGs, hard-linked as many times as needed (decoding costs the same, writing is quick)."""
    images, labels = common.synthetic_images(unique, size=64)
    rng = random.Random(0)
    os.makedirs(os.path.join(root, "pool"))
    pool = []
    for i in range(unique):
        size = (rng.randint(*sides), rng.randint(*sides))
        pool.append(os.path.join(root, "pool", f"{i}.jpg"))
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize(size, Image.BICUBIC).save(pool[-1], quality=90)
    for split, n in (("train", n_train), ("val", n_val)):
        for j in range(n):
            folder = os.path.join(root, split, f"class{int(labels[j % unique])}")
            os.makedirs(folder, exist_ok=True)
            os.link(pool[j % unique], os.path.join(folder, f"{j}.jpg"))
    return root


class StepMarks:
    """Wraps common.device_views: at the call that starts step `first` and at the one that starts step `last` it
    waits for the GPU and notes the time and how many warnings have been recorded, so the window holds whole steps."""

    def __init__(self, device_views, first, last, records, cuda):
        self.device_views, self.first, self.last, self.records, self.cuda = device_views, first, last, records, cuda
        self.calls, self.marks, self.batch = 0, {}, None

    def __call__(self, batch, *a, **k):
        if self.calls in (self.first, self.last):
            if self.cuda:
                torch.cuda.set_sync_debug_mode(0)  # this wait is the check's own, not the step's
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            self.marks[self.calls] = (time.perf_counter(), len(self.records))
            self.batch = len(batch["index"])
        self.calls += 1
        return self.device_views(batch, *a, **k)


def run_entry(name, argv, steps, warmup, cuda):
    """Run one entry point in this process; returns a row of the table."""
    row = {"entry": name, "ips": None, "peak_gib": None, "syncs": None, "wait": None, "sources": [], "error": None}
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        marks = StepMarks(common.device_views, warmup, steps - 1, records, cuda)
        common.device_views = marks
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with contextlib.redirect_stdout(out):
                if name in FRAMEWORKS:
                    common.main_base(["--framework", name, *argv])
                else:
                    mod = importlib.import_module(name)
                    mod.main(argv)
        except BaseException as e:  # one failing entry point must not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        finally:
            common.device_views = marks.device_views
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    lines = out.getvalue().strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    if warmup in marks.marks and steps - 1 in marks.marks:
        (t0, n0), (t1, n1) = marks.marks[warmup], marks.marks[steps - 1]
        n = steps - 1 - warmup
        row["ips"] = n * marks.batch / (t1 - t0)
        if cuda:
            syncs = [f"{os.path.basename(w.filename)}:{w.lineno}" for w in records[n0:n1]
                     if SYNC_MESSAGE in str(w.message)]
            row["syncs"], row["sources"] = len(syncs) / n, Counter(syncs).most_common(3)
    elif row["error"] is None:
        row["error"] = f"fewer than {steps} steps ran ({marks.calls})"
    if "data_wait_s" in summary and summary.get("train_time_s"):
        row["wait"] = summary["data_wait_s"] / summary["train_time_s"]
    return row


def _num(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def format_table(rows):
    """Markdown table of the rows, each measure next to its target; sync sources and errors below it."""
    lines = ["| entry point | data | img/s | target img/s | peak GPU memory (GiB) | host syncs/step | target | "
             "data-loader wait |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        target = TARGET_IPS.get(r["entry"])
        ok = "" if target is None or r["ips"] is None else (" ok" if r["ips"] >= target else " LOW")
        sync_ok = "" if r["syncs"] is None else (" ok" if r["syncs"] == 0 else " HIGH")
        lines.append(f"| {r['entry']} | {r['data']} | {_num(r['ips'], '.0f')}{ok} | {_num(target, 'd')} | "
                     f"{_num(r['peak_gib'], '.1f')} | {_num(r['syncs'], '.2f')}{sync_ok} | 0 | "
                     f"{_num(r['wait'], '.0%')} |")
        if r["sources"]:
            notes.append(f"{r['entry']} ({r['data']}): syncs from " + ", ".join(f"{s} x{c}" for s, c in r["sources"]))
        if r["error"]:
            notes.append(f"{r['entry']} ({r['data']}): FAILED {r['error']}")
    return "\n".join(lines + notes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="also run on this ImageFolder root (train/ and val/)")
    p.add_argument("--only", nargs="+", default=None, help="entry points to run (default: all, then linear_eval)")
    p.add_argument("--steps", type=int, default=60, help="steps per entry point (60: ~25 s each on an H100)")
    p.add_argument("--warmup", type=int, default=15, help="first steps left out of every measure (compile, autotune)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (a power of 2: queues are 2^k long)")
    p.add_argument("--cpu-smoke", action="store_true", help="2 steps of each on the CPU with tiny settings")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.cpu_smoke
    if not cuda and not a.cpu_smoke:
        print("gpu_check: no CUDA device here; nothing to measure (--cpu-smoke runs the script itself on the CPU)")
        return 0
    if a.cpu_smoke:  # 64 px images stay in memory and are cropped on the device: seconds, not minutes, on a CPU
        a.steps, a.warmup, a.batch_size, sides, arch, precision = 2, 0, 16, (64, 64), "resnet18", "fp32"
    else:
        sides, arch, precision = (256, 500), "resnet50", "bf16"
    entries = [e for e in FRAMEWORKS + METHODS + ["linear_eval"] if a.only is None or e in a.only]
    n_train = a.steps * a.batch_size
    tmp = tempfile.mkdtemp(prefix="gpu_check-")
    t_start = time.time()
    try:
        t = time.time()
        sets = [("synthetic jpeg", make_folder(os.path.join(tmp, "data"), n_train, 4 * a.batch_size, sides))]
        print(f"gpu_check: {n_train} training JPEGs of {sides[0]}-{sides[1]} px in {time.time() - t:.0f} s", flush=True)
        sets += [(os.path.basename(a.data.rstrip("/")), a.data)] if a.data else []
        device = torch.cuda.get_device_name() if cuda else "CPU"
        print(f"gpu_check: {device}, torch {torch.__version__}, {arch}, {precision}, batch {a.batch_size}, "
              f"{a.steps} steps per entry point of which {a.warmup} warm-up", flush=True)
        rows = []
        for label, root in sets:
            runs = {}
            for name in entries:
                out = os.path.join(tmp, "runs", f"{label}-{name}")
                if name == "linear_eval":
                    ckpt = runs.get("mocov2") or next(iter(runs.values()), None)
                    if ckpt is None:
                        continue
                    argv = [ckpt, "--dataset", "folder", "--data", root, "--epochs", "1", "--batch-size",
                            str(a.batch_size), "--subset", str(n_train), "--gpus", "1", "--out", out]
                else:
                    argv = ["--dataset", "folder", "--data", root, "--arch", arch, "--stem", "imagenet", "--precision",
                            precision, "--batch-size", str(a.batch_size), "--subset", str(n_train), "--knn-every", "0",
                            "--max-steps", str(a.steps), "--log-every", str(10 ** 9), "--gpus", "1", "--out", out]
                t = time.time()
                row = {**run_entry(name, argv, a.steps, a.warmup, cuda), "data": label}
                print(f"gpu_check: {name} on {label}: {time.time() - t:.0f} s"
                      + (f", FAILED {row['error']}" if row["error"] else ""), flush=True)
                rows.append(row)
                if row["error"] is None and name != "linear_eval":
                    runs[name] = os.path.join(out, "backbone.pth")
                    os.remove(os.path.join(out, "checkpoint.pth"))  # a ResNet-50 checkpoint is ~0.5 GB
        print(format_table(rows))
        print(f"gpu_check: {time.time() - t_start:.0f} s in all")
        return 1 if any(r["error"] for r in rows) else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
