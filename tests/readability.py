"""How much a reader must open to follow one training step, and how much of each method file is the method.

    python tests/readability.py          # the table quoted in README "How to read this code"

Step: the definitions of this repository that run while one training step of each method executes, found by
tracing (sys.setprofile) on a tiny synthetic batch: the method's crop sampler for one image, its recipes' draws,
then train_one_epoch's body for one batch (views on the device, forward = the method's loss, backward,
after_step). Generic pieces every method shares (the crop/resize/colour pipeline) are listed apart from the
method's path: a reader follows the method through train_one_epoch, its views, forward and what forward calls.
Share: lines of the method file outside its wiring (figures: the figure sections and every plot*/draw*/show*
function; the command line: parse and main), over all its lines. Strict share: only the sections that implement
the paper (losses, views, model, state), without the docstring, imports, DEFAULTS, parse, build and figures.
"""
import ast, importlib, os, sys, types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

METHODS = {"simclr": [], "mocov2": [], "byol": [], "simsiam": [], "logo": [], "co_ssl": [], "contrastive_crop": [],
           "leoclr": ["--queue-size", "64"], "clim": ["--queue-size", "64", "--clusters", "4"]}
TINY = ["--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--epochs", "1", "--stem", "imagenet",
        "--gpus", "0", "--knn-every", "0", "--workers", "0"]
PIPELINE = {"device_views", "crop_resize", "photometric", "_photometric", "_compiled_photometric", "_jitter_slots",
            "_gray", "_hue6", "adjust_hue", "gaussian_blur", "_channel_constant", "sample_rng", "draw", "ViewDataset",
            "__getitem__", "__len__", "cut_view"}
LOOP = {"train_one_epoch", "timed", "lr_factor", "log_progress", "check_finite", "mean_over_ranks", "print0",
        "fmt_time", "get_rank", "get_world", "is_dist", "is_main", "wrapped",  # wrapped: the fp32 decorator
        # generic layers and collectives a reader need not open to follow a method: BN, optimizer, gathers
        "SplitBatchNorm.forward", "LARS.step", "Model.after_step", "gather_no_grad", "gather_with_grad", "bn_splits_of"}
WIRING = ("figures", "--show-views", "main")
FIGURES = ("plot", "draw", "show")  # figure functions wherever they sit


def traced(fn):
    """Distinct (file, qualified name) of this repository's functions called while fn() runs."""
    seen = set()

    def prof(frame, event, arg):
        if event == "call":
            path = frame.f_code.co_filename
            if path.startswith(ROOT) and "/tests/" not in path:
                seen.add((os.path.basename(path), frame.f_code.co_qualname))
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def one_step(name):
    """The definitions one training step of `name` runs, as {(file, qualname)}."""
    if name in ("simclr", "mocov2", "byol", "simsiam"):
        args, build = common.parse_base(["--framework", name] + TINY), common.build_base
    else:
        mod = importlib.import_module(name)
        args, build = mod.parse(METHODS[name] + TINY), mod.build
    args.device = torch.device("cpu")
    data = common.load_data(args)
    common.resolve_data(args, data)
    setup = build(args, data)
    model = common.batch_norm_policy(setup.model, False, args.bn_splits, args.batch_size)
    if setup.state is not None:
        setup.state.before_epoch(args.epochs)  # a selection/localisation pass is not part of a step
    r = types.SimpleNamespace(args=args, setup=setup, data=data, model=model, net=model, step=0, total=1, spe=1,
                              opt=common.make_optimizer(model, args), dtype=torch.float32, images=data.train.images,
                              scaler=torch.amp.GradScaler("cpu", enabled=False), data_wait=[0.0], partial={},
                              ckpt="", train_time=0.0, stopped=False)
    ds = common.ViewDataset(data.train, setup.views, args.seed)
    batch = torch.utils.data.default_collate([ds[i] for i in range(args.batch_size)])
    r.dataset = ds
    r.sampler = types.SimpleNamespace(set_epoch=lambda *a: None)
    r.loader = [batch]
    args.log_every = 10 ** 9
    hw = [tuple(data.train.images.shape[-2:])]
    rng = common.sample_rng(0, 0, 0)
    return traced(lambda: (setup.views.crops(0, hw, rng), [rec.draw(rng) for rec in setup.views.recipes],
                           common.train_one_epoch(r, 0)))


def method_share(path):
    """(lines, method lines): wiring is the figures (sections and plot/draw/show functions) and the command line
    (parse, main); the rest (the paper's losses, views, model, state, its DEFAULTS recipe and build) is the method."""
    text = open(path).read()
    lines = text.splitlines()
    heads = [(i, l) for i, l in enumerate(lines) if l.startswith("# ====")] + [(len(lines), "end")]
    wiring = set()
    for (a, h), (b, _) in zip(heads, heads[1:]):
        if any(w in h for w in WIRING):
            wiring.update(range(a, b))
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and (node.name in ("parse", "main") or node.name.startswith(FIGURES)):
            wiring.update(range(node.lineno - 1, node.end_lineno + 2))  # with the blank lines after it
    strict = sum(b - a for (a, h), (b, _) in zip(heads, heads[1:])
                 if not any(w in h for w in WIRING + ("defaults", "command line")))
    strict -= sum(node.end_lineno - node.lineno + 1 for node in ast.parse(text).body  # figure functions in them
                  if isinstance(node, ast.FunctionDef) and node.name.startswith(FIGURES)
                  and not any(w in h for (a, h), (b, _) in zip(heads, heads[1:]) if a < node.lineno <= b
                              for w in WIRING + ("defaults", "command line")))
    return len(lines), len(lines) - len(wiring & set(range(len(lines)))), strict


def main():
    print("| method | definitions on one step's path (+ shared view pipeline) | files | "
          "method file: lines, method share |")
    print("|---|---|---|---|")
    for name in METHODS:
        seen = one_step(name)
        seen = {(f, q) for f, q in seen if "<" not in q or q.endswith("<locals>.place")}  # comprehensions, lambdas
        kind = lambda q: ("pipe" if q.split(".")[-1] in PIPELINE
                          else "loop" if q.split(".")[-1] in LOOP or q in LOOP else "path")
        path = ["train_one_epoch"] + [q for f, q in sorted(seen) if kind(q) == "path"]
        pipe = [q for f, q in sorted(seen) if kind(q) == "pipe"]
        files = sorted({f for f, q in seen if q in path})
        share = "-"
        if os.path.exists(os.path.join(ROOT, f"{name}.py")):
            n, m, strict = method_share(os.path.join(ROOT, f"{name}.py"))
            share = f"{n}, {100 * m / n:.0f} % ({100 * strict / n:.0f} %)"
        print(f"| {name} | {len(path)} (+ {len(pipe)}) | {', '.join(files)} | {share} |")
        print("   ", ", ".join(path), file=sys.stderr)
    long = [(f, i + 1) for f in sorted(os.listdir(ROOT)) if f.endswith(".py")
            for i, l in enumerate(open(os.path.join(ROOT, f))) if len(l.rstrip("\n")) > 120]
    print(f"\ncommon.py: {sum(1 for _ in open(os.path.join(ROOT, 'common.py')))} lines; "
          f"lines over 120 columns in the top-level files: {len(long)}")


if __name__ == "__main__":
    main()
