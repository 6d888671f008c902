"""Shared test helpers: run a script through its real command line, locate the real data, compare states."""
import json, math, os, shutil, signal, subprocess, sys, time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import free_port  # noqa: E402,F401  (the tests import it from here)
CIFAR_MINI = ROOT.parent / "shared" / "data" / "cifar10-mini"
requires_cifar_mini = pytest.mark.skipif(not CIFAR_MINI.exists(),
                                         reason=f"real data {CIFAR_MINI} is absent "
                                                f"(it ships beside the repository, not in it)")

# A few-step run: 32 px synthetic images, ImageNet stem (~12x cheaper than the CIFAR stem), no kNN monitor.
TINY = ["--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--stem", "imagenet", "--knn-every", "0",
        "--log-every", "1", "--gpus", "0"]

Result = namedtuple("Result", "rc out err json")


def run_cli(script, *args, nproc=1, timeout=600, threads=None):
    """Run `python script args` (or torchrun with nproc CPU processes over gloo); parse the last stdout line.
    threads: OMP_NUM_THREADS of each process (default 1 under torchrun, else the caller's or 2)."""
    target = str(ROOT / script)
    cmd = [sys.executable, target, *map(str, args)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), target, *map(str, args)]
    threads = threads or ("1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                         start_new_session=True)  # its own process group: the launcher, the ranks, their workers
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGUSR1, signal.SIGKILL):  # SIGUSR1: every rank and forked worker prints its Python
            try:                                        # stacks (common._worker); then all of them end
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass  # the group ended meanwhile
            time.sleep(5 if sig == signal.SIGUSR1 else 0)
        stdout, stderr = p.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout} s; where each process was:\n{stderr[-20000:]}\n"
                    f"stdout: {stdout[-3000:]}", pytrace=False)
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    try:
        js = json.loads(last)
    except json.JSONDecodeError:
        js = None
    return Result(p.returncode, stdout, stderr, js)


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")   # per process by design: never compared
EPS32 = torch.finfo(torch.float32).eps


def without(args, flag):
    """args with `flag` and its value removed."""
    i = args.index(flag)
    return args[:i] + args[i + 2:]


def load_model(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pth"), weights_only=False)["model"]


def assert_same_update(prev, one, two, rel=1e-3):
    """Two configurations (1 vs 2 processes, sharded vs whole) took the same optimizer step from the same state `prev`.

    The yardstick is that step itself. For every tensor t (parameters, EMA targets, queues; BN running statistics
    excluded) of n_t elements, in L2 norms:
        |one_t - two_t| <= rel * max(|one_t - prev_t|, rms * sqrt(n_t)) + 4 eps32 |one_t|
    where rms is the root-mean-square step of one element over the whole model. Where the numbers come from:
    - a real difference (a missing gradient all-reduce, other samples, crops or negatives on one rank, BN over other
      chunks) changes the step itself by a sizeable fraction of it (measured, worst tensor: 0.05 to 1.6);
    - one step of fp32 summation-order noise changes a gradient by about sqrt(terms) x eps ~ 1e-5 of itself
      (measured 1e-5 for 1 vs 2 processes, and the same for 1 process on 1 vs 2 threads): rel = 1e-3 leaves about
      two decades on each side;
    - the rms floor: a tensor whose gradient is a sum that nearly cancels (a BN bias) has noise relative to the terms
      summed, not to their small sum, so its yardstick is the step an average element of the model takes;
    - 4 eps32 |t| is the rounding of the stored tensor itself (a BN weight near 1.0 moves by whole ulps).
    Several steps are never compared this way: a summation-order difference grows by up to ~30x a step (SimCLR at
    T 0.5 on 8-sample BatchNorm), so after 4 steps it reaches 8 % of a step with identical semantics."""
    keys = [k for k, a in one.items() if not k.endswith(BN_STATS) and a.is_floating_point()]
    for k, a in one.items():
        if not k.endswith(BN_STATS) and not a.is_floating_point():
            assert torch.equal(a, two[k]), k   # integer state (queue pointers) must agree exactly
    steps = {k: (one[k].double() - prev[k].double()).norm().item() for k in keys}
    rms = math.sqrt(sum(v * v for v in steps.values()) / sum(one[k].numel() for k in keys))
    bad = []
    for k in keys:
        diff = (one[k].double() - two[k].double()).norm().item()
        yardstick = max(steps[k], rms * math.sqrt(one[k].numel()))
        if diff > rel * yardstick + 4 * EPS32 * one[k].double().norm().item():
            ratio = diff / yardstick
            bad.append((ratio, f"{k}: |diff| {diff:.3g} vs step {steps[k]:.3g} (ratio {ratio:.3g})"))
    assert not bad, f"{len(bad)} tensors differ by more than {rel:g} of one step, worst first: " + "; ".join(
        b for _, b in sorted(bad, reverse=True)[:3])


def last_step_both_ways(script, args, steps, root, nproc_two=2, runner=None, results=None):
    """Train `steps - 1` steps in one process (split-BN over 2 chunks stands in for 2 processes), then take the last
    step from that same checkpoint twice: in one process, and in `nproc_two` processes. Returns the three models
    (prev, one, two); `results`, a list, receives the three runs' Results. Starting both from one state makes the
    comparison one step's noise (see assert_same_update)."""
    root = Path(root)
    runs = [] if results is None else results
    r = run_cli(script, *args, "--bn-splits", "2", "--max-steps", steps - 1, "--out", root / "prev")
    runs.append(r)
    assert r.rc == 0 and r.json["steps"] == steps - 1, r.err[-3000:]
    for d in ("one", "two"):
        shutil.copytree(root / "prev", root / d)
    r = run_cli(script, *args, "--bn-splits", "2", "--max-steps", steps, "--out", root / "one")
    runs.append(r)
    assert r.rc == 0 and r.json["steps"] == steps, r.err[-3000:]
    r = (runner or run_cli)(script, *args, "--max-steps", steps, "--out", root / "two", nproc=nproc_two)
    runs.append(r)
    assert r.rc == 0 and r.json["steps"] == steps, r.err[-3000:]
    return tuple(load_model(root / d) for d in ("prev", "one", "two"))


def pytest_configure(config):
    # torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (not in our package list)
    config.addinivalue_line("filterwarnings", "ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "run")
