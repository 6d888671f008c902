"""Shared test helpers: run a script through its real command line, locate the real data, compare states."""
import json, os, socket, subprocess, sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR_MINI = ROOT.parent / "shared" / "data" / "cifar10-mini"
requires_cifar_mini = pytest.mark.skipif(not CIFAR_MINI.exists(),
                                         reason=f"real data {CIFAR_MINI} is absent (it ships beside the repository, not in it)")

# A few-step run: 32 px synthetic images, ImageNet stem (~12x cheaper than the CIFAR stem), no kNN monitor.
TINY = ["--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--stem", "imagenet", "--knn-every", "0",
        "--log-every", "1", "--gpus", "0"]

Result = namedtuple("Result", "rc out err json")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(script, *args, nproc=1, timeout=600):
    """Run `python script args` (or torchrun with nproc CPU processes over gloo); parse the last stdout line."""
    target = str(ROOT / script)
    cmd = [sys.executable, target, *map(str, args)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), target, *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    try:
        js = json.loads(last)
    except json.JSONDecodeError:
        js = None
    return Result(p.returncode, p.stdout, p.stderr, js)


def params_close(sd_a, sd_b, atol=1e-5, rtol=1e-4):
    """True when two state dicts agree on every tensor except BN running statistics (per-process by design)."""
    skip = ("running_mean", "running_var", "num_batches_tracked")
    bad = [k for k in sd_a if not k.endswith(skip) and not torch.allclose(sd_a[k].float(), sd_b[k].float(), atol=atol, rtol=rtol)]
    assert not bad, f"{len(bad)} tensors differ, first: {bad[:3]}"
    return True


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "run")
