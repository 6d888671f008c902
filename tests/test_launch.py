"""The launch path users run: `--gpus N` spawns N processes whose DataLoader workers start by spawn too.

On the CPU, `--device cpu --gpus 2` takes exactly that path (torch.multiprocessing.spawn, gloo instead of nccl), so
every entry point is run here as `python logo.py --dataset imagenet --gpus 8` runs, on real JPEG files read by
workers, and compared with the torchrun launch of the same command."""
import os, socket, subprocess, sys
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import common
from conftest import ROOT, load_model, run_cli

ENTRY_POINTS = {  # script -> flags of a one-step run (small, valid for each method; queues below 16 - 4 images)
    "common.py": ["--framework", "mocov2", "--queue-size", "8"],
    "logo.py": ["--framework", "mocov2", "--moco-k", "8"],
    "co_ssl.py": [],
    "contrastive_crop.py": ["--queue-size", "8"],
    "leoclr.py": ["--queue-size", "8"],
    "clim.py": ["--queue-size", "8", "--clusters", "2"],
}
RUN = ["--dataset", "folder", "--arch", "resnet18", "--stem", "imagenet", "--batch-size", "4", "--epochs", "1",
       "--max-steps", "1", "--knn-every", "0", "--log-every", "1", "--workers", "2", "--seed", "0"]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """An ImageFolder of 16 real JPEG files (2 classes, 112 x 100 px: larger than the in-memory limit, so every
    image is decoded by a DataLoader worker), with a val split."""
    root = tmp_path_factory.mktemp("jpegs")
    images, labels = common.synthetic_images(24, size=112)
    for i, (img, label) in enumerate(zip(images, labels)):
        split = "train" if i < 16 else "val"
        d = root / split / f"class{int(label) % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()[:100]).save(d / f"img{i:02d}.jpg", quality=90)
    return root


def spawn_cli(script, *args, timeout=600):
    """`python script --gpus 2 --device cpu ...`: the --gpus N launcher, on the CPU."""
    return run_cli(script, *args, "--gpus", "2", "--device", "cpu", timeout=timeout, threads=1)  # as torchrun


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_spawn_launch_equals_torchrun(entry, jpeg_folder, tmp_path):
    args = [*RUN, "--data", jpeg_folder, *ENTRY_POINTS[entry]]
    script = entry
    spawned = spawn_cli(script, *args, "--out", tmp_path / "spawn")
    assert spawned.rc == 0 and spawned.json["steps"] == 1, spawned.err[-3000:]
    assert "2 process(es)" in spawned.out
    launched = run_cli(script, *args, "--gpus", "0", "--out", tmp_path / "torchrun", nproc=2)
    assert launched.rc == 0, launched.err[-3000:]
    a, b = load_model(tmp_path / "spawn"), load_model(tmp_path / "torchrun")
    # Same configuration (2 processes, same data, same workers' crops): only the launcher differs, so bit-exact.
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_linear_eval_spawned_equals_torchrun(jpeg_folder, tmp_path):
    """linear_eval.py trains its probe on augmented views read by spawned workers (no --precompute)."""
    (tmp_path / "run").mkdir()
    common.export_backbone(common.build_backbone("resnet18", "imagenet"), str(tmp_path / "run" / "backbone.pth"))
    args = [tmp_path / "run", "--dataset", "folder", "--data", jpeg_folder, "--epochs", "1", "--batch-size", "8",
            "--workers", "2", "--size", "32"]
    spawned = spawn_cli("linear_eval.py", *args)
    launched = run_cli("linear_eval.py", *args, "--gpus", "0", nproc=2)
    assert spawned.rc == 0 and launched.rc == 0, spawned.err[-3000:] + launched.err[-3000:]
    one, two = (res.json["runs"][str(tmp_path / "run")] for res in (spawned, launched))
    assert one == two and {"linear_top1", "knn_top1"} <= set(one)


def _datasets(jpeg_folder):
    """The training dataset of every entry point, built as fit builds it."""
    import clim, co_ssl, contrastive_crop, leoclr, logo
    mods = {"common.py": SimpleNamespace(parse=common.parse_base, build=common.build_base), "logo.py": logo,
            "co_ssl.py": co_ssl, "contrastive_crop.py": contrastive_crop, "leoclr.py": leoclr, "clim.py": clim}
    for entry, flags in ENTRY_POINTS.items():
        mod = mods[entry]
        args = mod.parse([*RUN, "--data", str(jpeg_folder), *flags, "--gpus", "0"])
        args.device = torch.device("cpu")
        data = common.load_data(args)
        common.resolve_data(args, data)
        setup = mod.build(args, data)
        yield entry, common.ViewDataset(data.train, setup.views, args.seed)


def test_every_training_dataset_pickles_for_spawned_workers(jpeg_folder):
    """What a spawned DataLoader worker receives is pickled: no closures, no lambdas, no bound model."""
    for entry, ds in _datasets(jpeg_folder):
        assert not ds.source.in_memory, entry
        blob = ForkingPickler.dumps(ds)
        assert len(blob) < 200_000, f"{entry}: {len(blob)} bytes (a model or image cache went along)"
        copy = ForkingPickler.loads(blob)
        a, b = ds[3], copy[3]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                            for k in a), entry


# ---------------------------------------------------------------- every rank speaks, one line, exit 2

def _one_clear_line(r, *phrases):
    lines = [l for l in r.err.splitlines() if l.startswith("error:")]
    assert r.rc == 2 and len(lines) == 1 and "Traceback" not in r.err, r.err[-3000:]
    assert all(p in lines[0] for p in phrases), lines[0]
    # the others end by themselves (no SIGTERM from the launcher, no semaphores left behind by a killed rank)
    assert not any(w in r.err for w in ("Exception ignored", "leaked semaphore", "via signal SIGTERM")), r.err[-3000:]


def test_bad_image_met_by_rank_1_only(jpeg_folder, tmp_path):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(jpeg_folder, root)
    files = sorted(str(p) for p in (root / "train").rglob("*.jpg"))          # the dataset's index order
    sampler = common.GlobalBatchSampler(len(files), 4, 0, rank=1, world=2)
    victim = files[next(iter(sampler))[0]]                                      # rank 1's first image at step 1
    with open(victim, "r+b") as f:
        f.truncate(200)
    r = spawn_cli("common.py", *RUN, "--data", root, "--framework", "simclr", "--out", tmp_path / "o")
    _one_clear_line(r, "rank 1", os.path.basename(victim))


def test_nan_on_every_rank_is_reported_once(tmp_path):
    r = spawn_cli("common.py", "--dataset", "synthetic", "--subset", "32", "--batch-size", "8", "--stem", "imagenet",
                  "--framework", "simclr", "--epochs", "1", "--max-steps", "2", "--knn-every", "0", "--lr", "1e30",
                  "--log-every", "1", "--out", tmp_path / "o")
    _one_clear_line(r, "NaN or inf")


def test_world_size_without_rank_and_port_in_use(tmp_path):
    script = str(ROOT / "common.py")
    base = [sys.executable, script, "--dataset", "synthetic", "--subset", "32", "--batch-size", "8",
            "--epochs", "1", "--out", str(tmp_path / "o")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run(base, capture_output=True, text=True, env={**env, "WORLD_SIZE": "2"}, timeout=300)
    _one_clear_line(SimpleNamespace(rc=p.returncode, err=p.stderr), "RANK", "torchrun")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = subprocess.run(base, capture_output=True, text=True, timeout=300, env={
            **env, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    _one_clear_line(SimpleNamespace(rc=p.returncode, err=p.stderr), f"port {port}", "in use")


STUCK = """
import sys, time
from types import SimpleNamespace
import common
def wait_forever(args):
    print("ready", flush=True)
    time.sleep(600)
common._worker(0, wait_forever, SimpleNamespace(gpus=0, device_type="cpu"), None)
"""


def test_a_stuck_process_says_where_it_is_on_sigusr1(tmp_path):
    """`kill -USR1 PID` makes a running script print its Python stacks (how run_cli reports a test that hangs)."""
    import select, signal
    (tmp_path / "stuck.py").write_text(STUCK)
    p = subprocess.Popen([sys.executable, str(tmp_path / "stuck.py")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert p.stdout.readline().strip() == b"ready"
        p.send_signal(signal.SIGUSR1)
        dump = ""  # a header, then the stack, innermost first; read unbuffered, as it comes, for up to 60 s
        while "wait_forever" not in dump and select.select([p.stderr], [], [], 60)[0]:
            chunk = os.read(p.stderr.fileno(), 65536).decode()
            if not chunk:
                break  # the process ended
            dump += chunk
        assert p.poll() is None, "the signal must not end the process"
    finally:
        p.kill()
        p.communicate()
    assert any("wait_forever" in l and "stuck.py" in l for l in dump.splitlines()), dump


def test_more_gpus_than_present_is_refused_without_device_cpu(tmp_path):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    r = run_cli("common.py", "--dataset", "synthetic", "--gpus", "2", "--out", tmp_path / "o")
    _one_clear_line(r, "--gpus 2", "--device cpu")


# ---------------------------------------------------------------- resume across configurations

def test_resume_at_another_precision_and_process_count(tmp_path):
    """A checkpoint saved by 1 process in fp32 resumes in bf16, then in 2 processes in fp16 (loss scale afresh)."""
    args = ["--dataset", "synthetic", "--subset", "32", "--batch-size", "8", "--stem", "imagenet", "--framework",
            "mocov2", "--queue-size", "16", "--epochs", "1", "--knn-every", "0", "--bn-splits", "2",
            "--out", tmp_path / "o"]
    assert run_cli("common.py", *args, "--max-steps", "1", "--gpus", "0").rc == 0
    r = run_cli("common.py", *args, "--max-steps", "2", "--gpus", "0", "--precision", "bf16")
    assert r.rc == 0 and r.json["steps"] == 2, r.err[-3000:]
    r = spawn_cli("common.py", *args, "--max-steps", "3", "--precision", "fp16")
    assert r.rc == 0 and r.json["steps"] == 3, r.err[-3000:]
    assert "loss scale starts afresh" in r.out and "rank 1 had no saved" in r.out
    ck = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=False)
    assert len(ck["rng"]) == 2 and ck["scaler"] and ck["step"] == 3


# ---------------------------------------------------------------- the CUDA-only branches, on the CPU

def test_sync_batch_norm_conversion_round_trip():
    """SyncBN (CUDA multi-process) keeps torchvision's state dict: backbone.pth still loads into a plain ResNet."""
    net = common.build_backbone("resnet18", "imagenet")
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in sync.modules()) == 20
    plain = torchvision.models.resnet18()
    plain.fc = nn.Identity()
    plain.load_state_dict(sync.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(plain.eval()(x), sync.eval()(x))   # eval: both are the same affine map, same kernels


def test_process_group_options():
    cuda, cpu = common.process_group_options(True, 3), common.process_group_options(False, 3)
    assert cuda["backend"] == "nccl" and cuda["device_id"] == torch.device("cuda", 3)
    assert cpu == {"backend": "gloo", "timeout": common.DIST_TIMEOUT} and cuda["timeout"] == common.DIST_TIMEOUT


def test_default_workers_share_this_process_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert common.default_workers(True, SimpleNamespace(gpus=8)) == 0                   # in memory: cropped on device
    assert common.default_workers(False, SimpleNamespace(gpus=1)) == cores
    assert common.default_workers(False, SimpleNamespace(gpus=2 * cores)) == 1          # never 0 for files
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")                                          # torchrun: the environment
    assert common.default_workers(False, SimpleNamespace(gpus=1)) == max(1, cores // 2)
