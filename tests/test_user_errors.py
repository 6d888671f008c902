"""A new user's mistakes, in one table-driven file: each is one line `error: ...` on stderr, exit status 2, no
traceback, nothing written over; the cases that must work go through.

Part 1, the command line and accidents (disk full, a second run on the same --out). CASES is the table of real
script runs (conftest.run_cli); the in-process tests check what a subprocess cannot (torch.save failing) or what is
cheaper without one (every ranged flag of every script, the resume comparison).
Part 2, data. ROWS is the table of real script runs on broken data; the folder scan takes what is an image only:
hidden entries (.ipynb_checkpoints, macOS's ._x.jpg) are skipped, extensions match in any case, and val classes
are matched to the training classes by name."""
import errno, importlib, os, socket, subprocess, sys
import urllib.error
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import TINY, run_cli
import common

SCRIPTS = ["common", "logo", "co_ssl", "contrastive_crop", "leoclr", "clim"]
RUN = [*TINY, "--subset", "32", "--epochs", "1"]  # 2 steps per epoch
SIMCLR = ["common.py", *RUN, "--framework", "simclr"]
LOCK = "{out}/lock"

# argv (first item: the script), exit status, a phrase of stderr (of stdout + stderr when the run succeeds);
# before: a run that must succeed first (same --out); env: variables set for the run; lock: "alive" or "dead" writes
# {out}/lock first with the pid of a live (this test's) or of an ended process. {out} and {file} (a regular file)
# are filled in per test.
Case = namedtuple("Case", "argv rc phrase before env lock", defaults=(None, None, None))
CASES = {
    "abbreviation": Case([*SIMCLR, "--epoch", "3"], 2, "unrecognized arguments: --epoch 3"),
    "epochs 0": Case([*SIMCLR, "--epochs", "0"], 2, "--epochs 0 is out of range: it must be >= 1"),
    "epochs negative": Case(["logo.py", *RUN, "--epochs", "-2"], 2, "--epochs -2 is out of range"),
    "batch 0": Case([*SIMCLR, "--batch-size", "0"], 2, "--batch-size 0 is out of range: it must be >= 2"),
    "batch 1": Case(["leoclr.py", *RUN, "--batch-size", "1"], 2, "--batch-size 1 is out of range: it must be >= 2"),
    "lr 0": Case(["co_ssl.py", *RUN, "--lr", "0"], 2, "--lr 0.0 is out of range: it must be > 0"),
    "warm-up = epochs": Case(["contrastive_crop.py", *RUN, "--warmup-epochs", "1"], 2,
                             "--warmup-epochs 1.0 is out of range: it must be in [0, --epochs 1)"),
    "ema 1": Case(["clim.py", *RUN, "--ema", "1"], 2, "--ema 1.0 is out of range: it must be in [0, 1)"),
    "crop scale 0": Case([*SIMCLR, "--crop-min-scale", "0"], 2, "--crop-min-scale 0.0 is out of range"),
    "workers negative": Case([*SIMCLR, "--workers", "-1"], 2, "--workers -1 is out of range: it must be >= 0"),
    "log-every 0": Case([*SIMCLR, "--log-every", "0"], 2, "--log-every 0 is out of range: it must be >= 1"),
    "out under a file": Case([*SIMCLR, "--out", "{file}/run"], 2, "--out {file}/run cannot be created"),
    "resume, other lr": Case([*SIMCLR, "--lr", "0.5"], 2, "--lr 0.3 (now 0.5)",
                             before=[*SIMCLR, "--lr", "0.3", "--max-steps", "1"]),
    "resume, other epochs": Case([*SIMCLR, "--epochs", "2"], 2, "--epochs 1 (now 2)",
                                 before=[*SIMCLR, "--max-steps", "1"]),
    "resume, other workers and log-every": Case([*SIMCLR, "--workers", "1", "--log-every", "2"], 0,
                                                "resumed from {out}/checkpoint.pth at epoch 0 step 1",
                                                before=[*SIMCLR, "--max-steps", "1"]),
    "resume, other precision": Case([*SIMCLR, "--precision", "fp16"], 0, "the fp16 loss scale starts afresh",
                                    before=[*SIMCLR, "--precision", "fp32", "--max-steps", "1"]),
    "WORLD_SIZE without RANK": Case(SIMCLR, 2, "RANK, MASTER_ADDR, MASTER_PORT not set while WORLD_SIZE is",
                                    env={"WORLD_SIZE": "2"}),
    "lock of a live run": Case(SIMCLR, 2, f"{LOCK}: process {{pid}} on", lock="alive"),
    "lock of an ended run": Case(SIMCLR, 0, f"note: {LOCK} was left by process {{pid}}, which is gone", lock="dead"),
}


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(out, pid):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lock"), "w") as f:
        f.write(f"{pid} {socket.gethostname()}\n")


@pytest.mark.parametrize("name", list(CASES))
def test_cli(name, tmp_path, monkeypatch):
    case = CASES[name]
    out, regular = str(tmp_path / "run"), tmp_path / "f"
    regular.write_text("a regular file, not a folder")
    pid = {"alive": os.getpid(), "dead": dead_pid()}.get(case.lock)
    fill = lambda argv: [str(a).format(out=out, file=regular) for a in argv]
    if case.before:
        r = run_cli(*fill(case.before), "--out", out)
        assert r.rc == 0, r.err[-3000:]
    if case.lock:
        write_lock(out, pid)
    monkeypatch.delenv("RANK", raising=False)
    for k, v in (case.env or {}).items():
        monkeypatch.setenv(k, v)
    argv = fill(case.argv)
    r = run_cli(*argv, *([] if "--out" in argv else ["--out", out]))
    phrase = case.phrase.format(out=out, file=regular, pid=pid)
    assert r.rc == case.rc and "Traceback" not in r.err, r.err[-3000:]
    if case.rc:
        lines = [line for line in r.err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and phrase in lines[0], r.err[-3000:]
    else:
        assert phrase in r.out + r.err, (r.out + r.err)[-3000:]
    if case.lock == "dead":
        assert not os.path.exists(os.path.join(out, "lock"))      # taken over, then removed at the end
    elif case.lock == "alive":
        assert open(os.path.join(out, "lock")).read().split()[0] == str(pid)   # the live run's lock is untouched


# ---------------------------------------------------------------- in process

def ranged_flags(name):
    """(flag, bad values) of every FLAG_RANGES entry the script has: just outside each finite end."""
    mod = importlib.import_module(name)
    parse = common.parse_base if name == "common" else mod.parse
    args = parse(["--dataset", "synthetic"])
    flags = {}
    for dest, spec in common.FLAG_RANGES.items():
        if not hasattr(args, dest):
            continue
        interval = spec.split("; ")[0]
        lo, hi = (e.strip() for e in interval[1:-1].split(","))
        bad = [int(lo) - (interval[0] == "[")]
        if hi == "epochs":
            bad += [["3", "--epochs", "3"]]
        elif hi != "inf":
            bad += [int(hi) + (interval[-1] == "]")]
        width = len(getattr(args, dest)) if isinstance(getattr(args, dest), list) else 1
        flags["--" + dest.replace("_", "-")] = [[str(b)] * width if not isinstance(b, list) else b for b in bad]
    return parse, flags


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_numeric_flag_is_range_checked(name, capsys):
    parse, flags = ranged_flags(name)
    assert "--epochs" in flags and "--batch-size" in flags and len(flags) >= 16
    for flag, bads in flags.items():
        for bad in bads:
            with pytest.raises(SystemExit) as e:
                parse(["--dataset", "synthetic", flag, *bad])
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.startswith(f"error: {flag} ") and "is out of range" in err, (flag, err)
            assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", SCRIPTS + ["linear_eval"])
def test_no_prefix_matching(name, capsys):
    mod = importlib.import_module(name)
    parse = common.parse_base if name == "common" else mod.parse
    with pytest.raises(SystemExit) as e:
        parse(["--dataset", "synthetic", "--epoch", "3"] + (["run"] if name == "linear_eval" else []))
    assert e.value.code == 2 and "unrecognized arguments: --epoch" in capsys.readouterr().err  # linear_eval: 3 a run


def test_save_atomic_disk_full_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    torch.save({"step": 1}, path)

    def full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(common.UserError, match="disk is full") as e:
        common.save_atomic({"step": 2}, path)
    assert path in str(e.value) and "previous one is kept" in str(e.value)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1} and os.listdir(tmp_path) == ["checkpoint.pth"]


def test_save_atomic_zip_writer_failure_is_a_user_error(tmp_path, monkeypatch):
    path = str(tmp_path / "backbone.pth")

    def failed(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed")

    monkeypatch.setattr(torch, "save", failed)
    with pytest.raises(common.UserError, match="writing .*backbone.pth failed"):
        common.save_atomic({}, path)
    assert not os.listdir(tmp_path)


def test_resume_lists_every_changed_flag(tmp_path):
    saved = {"lr": 0.1, "seed": 0, "workers": 8, "log_every": 50, "out": "a", "epochs": 5, "gone": 1}
    path = str(tmp_path / "checkpoint.pth")
    torch.save({"args": saved, "method": "m", "steps_per_epoch": 2}, path)
    now = SimpleNamespace(**{**saved, "lr": 0.2, "seed": 1, "workers": 0, "log_every": 1, "out": "b", "new": 3,
                             "device": torch.device("cpu")})
    del now.gone
    with pytest.raises(common.UserError) as e:
        common.load_checkpoint(path, now, "m", 2)
    msg = str(e.value)
    assert all(s in msg for s in ("--lr 0.1 (now 0.2)", "--seed 0 (now 1)", "--gone 1 (now unset)",
                                  "--new unset (now 3)", "another --out", f"delete {path}"))
    assert "--workers" not in msg and "--log-every" not in msg and "--out a" not in msg
    now = SimpleNamespace(**{**saved, "workers": 0, "precision": "bf16", "max_steps": 9})
    assert common.load_checkpoint(path, now, "m", 2)["method"] == "m"
    with pytest.raises(common.UserError, match="made by method m, this run is other"):
        common.load_checkpoint(path, now, "other", 2)


TINY_MAIN = [*map(str, RUN), "--framework", "simclr", "--max-steps", "1"]


def test_lock_of_a_live_run_refuses_in_process(tmp_path, capsys):
    out = str(tmp_path / "run")
    write_lock(out, os.getpid())
    with pytest.raises(SystemExit) as e:
        common.main_base([*TINY_MAIN, "--out", out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and os.path.join(out, "lock") in err and f"process {os.getpid()}" in err
    assert not os.path.exists(os.path.join(out, "checkpoint.pth"))


def test_stale_lock_is_taken_over_in_process(tmp_path, capsys):
    out, pid = str(tmp_path / "run"), dead_pid()
    write_lock(out, pid)
    common.main_base([*TINY_MAIN, "--out", out])
    printed = capsys.readouterr().out
    assert f"was left by process {pid}, which is gone; taking it over" in printed
    assert os.path.exists(os.path.join(out, "checkpoint.pth")) and not os.path.exists(os.path.join(out, "lock"))


def test_lock_is_removed_after_an_error(tmp_path, capsys):
    """A run that fails after taking the lock (here: a checkpoint of another method) leaves no lock behind."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    torch.save({"args": {}, "method": "another", "steps_per_epoch": 2}, os.path.join(out, "checkpoint.pth"))
    with pytest.raises(SystemExit) as e:
        common.main_base([*TINY_MAIN, "--out", out])
    assert e.value.code == 2 and "made by method another" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "lock"))


# ================================================================ part 2: data

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

# A few seconds a run: the error comes from loading the data or from the first batch, before any step.
DATA_TINY = ["--epochs", "1", "--batch-size", "4", "--max-steps", "1", "--stem", "imagenet", "--knn-every", "0",
        "--gpus", "0", "--workers", "0", "--warmup-epochs", "0", "--bn-splits", "1"]


def image(path, side=8, fmt="PNG", seed=0):
    """A noise image of side x side px (JPEG or PNG, whatever the file's name says)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return str(path)


def junk(path, data=b"\x00\x05\x16\x07 not an image"):
    """What macOS leaves beside copied files (._x.jpg: AppleDouble metadata), or any other non-image."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").write(data)


def data_args(**kw):
    return SimpleNamespace(**{**dict(dataset="folder", data=".", download=False, class_list=None, subset=0), **kw})


# ---------------------------------------------------------------- the table: one real script run per mistake

def file_as_data(dataset, name="data.txt"):
    """--data naming a file (a list, or the downloaded archive itself) instead of the folder."""
    def build(tmp):
        junk(tmp / name)
        phrases = [f"--data {tmp / name} is a file", "pass --data DIR", common.LAYOUT[dataset]]
        return ["--dataset", dataset, "--data", tmp / name], phrases + (["extract the archive"] * name.endswith(".gz"))
    return build


def val_class_unknown(tmp):
    for c in "ab":
        for j in range(2):
            image(tmp / "d" / "train" / c / f"{j}.png", seed=j)
    image(tmp / "d" / "val" / "a" / "0.png")
    image(tmp / "d" / "val" / "c" / "0.png")
    return ["--dataset", "folder", "--data", tmp / "d"], ["'c'", str(tmp / "d" / "val"), str(tmp / "d" / "train")]


def class_list_missing(tmp):
    for c in "ab":
        for j in range(2):
            image(tmp / "d" / "train" / c / f"{j}.png", seed=j)
    return (["--dataset", "folder", "--data", tmp / "d", "--class-list", tmp / "wnids.txt"],
            [f"--class-list {tmp / 'wnids.txt'} does not exist"])


def one_pixel_images(tmp):
    for j in range(4):
        image(tmp / "d" / f"{j}.png", side=1, seed=j)
    return ["--dataset", "folder", "--data", tmp / "d"], [f"{tmp / 'd' / '0.png'} is 1x1 px", "too small"]


def small_image_among_files(tmp):
    """120 px JPEGs are read from their files (not kept in memory): the 4x4 one is met by a DataLoader worker."""
    for j in range(3):
        image(tmp / "d" / f"{j}.jpg", side=120, fmt="JPEG", seed=j)
    image(tmp / "d" / "z.png", side=4)
    return ["--dataset", "folder", "--data", tmp / "d", "--workers", "1"], [f"{tmp / 'd' / 'z.png'} is 4x4 px"]


def truncated_jpeg_in_worker(tmp):
    for j in range(3):
        image(tmp / "d" / f"{j}.jpg", side=120, fmt="JPEG", seed=j)
    whole = open(tmp / "d" / "0.jpg", "rb").read()
    junk(tmp / "d" / "z_broken.jpg", whole[:len(whole) // 2])  # sorted last: the first file read is a good one
    return (["--dataset", "folder", "--data", tmp / "d", "--workers", "1"],
            [f"cannot read image {tmp / 'd' / 'z_broken.jpg'}", "remove or replace"])


def only_hidden_entries(tmp):
    junk(tmp / "d" / "._a.jpg")
    junk(tmp / "d" / ".DS_Store")
    image(tmp / "d" / ".ipynb_checkpoints" / "a-checkpoint.png")
    return ["--dataset", "folder", "--data", tmp / "d"], [f"no images found under {tmp / 'd'}"]


Row = namedtuple("Row", "id script build")
ROWS = [Row("data-file-folder", "logo.py", file_as_data("folder", "data.tar.gz")),
        Row("data-file-imagenet", "contrastive_crop.py", file_as_data("imagenet")),
        Row("data-file-imagenet100", "clim.py", file_as_data("imagenet100")),
        Row("data-file-tinyimagenet", "co_ssl.py", file_as_data("tinyimagenet")),
        Row("data-file-cifar10", "leoclr.py", file_as_data("cifar10", "cifar-10-python.tar.gz")),
        Row("val-class-unknown", "common.py", val_class_unknown),
        Row("class-list-missing", "logo.py", class_list_missing),
        Row("1px-images", "co_ssl.py", one_pixel_images),
        Row("small-file-in-worker", "leoclr.py", small_image_among_files),
        Row("truncated-jpeg-in-worker", "leoclr.py", truncated_jpeg_in_worker),
        Row("only-hidden-entries", "clim.py", only_hidden_entries)]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_data_mistake_is_one_line(row, tmp_path):
    args, phrases = row.build(tmp_path)
    extra = ["--framework", "simclr"] if row.script == "common.py" else []
    r = run_cli(row.script, *DATA_TINY, *extra, *args, "--out", tmp_path / "run")
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert r.rc == 2, r.err[-3000:]
    assert "Traceback" not in r.err, r.err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err[-3000:]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


# ---------------------------------------------------------------- --download offline, in process (no network)

@pytest.mark.parametrize("dataset,cls", [("cifar10", "CIFAR10"), ("cifar100", "CIFAR100"), ("stl10", "STL10")])
def test_offline_download_is_one_line(dataset, cls, tmp_path, monkeypatch, capsys):
    import leoclr

    def offline(**kw):
        assert os.path.isdir(kw["root"])  # made before the download, never refused for not existing
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr(torchvision.datasets, cls, offline)
    root = tmp_path / "new" / "data"
    with pytest.raises(SystemExit) as e:
        leoclr.main(["--dataset", dataset, "--data", str(root), "--download", *DATA_TINY,
                     "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for phrase in [f"downloading {cls.replace('STL10', 'STL-10')} into {root} failed", "URLError",
                   "name resolution", "place the files there yourself", common.LAYOUT[dataset]]:
        assert phrase in lines[0], (phrase, lines[0])


def test_download_failure_without_network_error_is_said_too(tmp_path, monkeypatch):
    def corrupt(**kw):
        raise RuntimeError("File not found or corrupted.")  # torchvision after a download that fails its checksum
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", corrupt)
    with pytest.raises(common.UserError, match="downloading CIFAR10 into .* failed .*corrupted"):
        common.load_data(data_args(dataset="cifar10", data=str(tmp_path), download=True))
    with pytest.raises(common.UserError, match="CIFAR10 not found under .*pass --download"):
        common.load_data(data_args(dataset="cifar10", data=str(tmp_path), download=False))


# ---------------------------------------------------------------- what the folder scan takes

def test_hidden_entries_are_skipped_and_extensions_match_in_any_case(tmp_path):
    root = tmp_path / "train"
    for name in ["a/x.JPG", "a/y.Png", "a/sub/w.jpeg", "b/z.Jpeg", "b/q.TIFF"]:
        image(root / name, fmt="JPEG" if "jp" in name.lower() else None)
    for name in ["a/._x.JPG", "b/._z.Jpeg", "a/.hidden.png", "a/notes.txt", "b/.DS_Store"]:
        junk(root / name)
    image(root / "a" / ".ipynb_checkpoints" / "x-checkpoint.jpg", fmt="JPEG")  # a hidden folder inside a class
    image(root / ".ipynb_checkpoints" / "y.png")                                # a hidden "class" with an image
    os.makedirs(root / ".empty_hidden")                                          # and an empty one
    src = common._folder(str(root), "t")
    assert src.classes == ["a", "b"]
    assert [os.path.relpath(f, root) for f in src.files] == ["a/x.JPG", "a/y.Png", "a/sub/w.jpeg", "b/q.TIFF",
                                                             "b/z.Jpeg"]
    assert src.labels.tolist() == [0, 0, 0, 1, 1]
    image(tmp_path / "val" / "b" / "v.PNG")
    junk(tmp_path / "val" / "b" / "._v.PNG")
    image(tmp_path / "val" / ".ipynb_checkpoints" / "v.png")
    d = common.load_data(data_args(data=str(tmp_path)))  # every file is read: a ._ file taken would fail here
    assert d.train.in_memory and len(d.train) == 5 and d.knn_val.labels.tolist() == [1]


def test_flat_folder_skips_hidden_files(tmp_path):
    image(tmp_path / "a.JPG", fmt="JPEG")
    image(tmp_path / "b.webp", fmt="WEBP")
    junk(tmp_path / "._a.JPG")
    junk(tmp_path / ".DS_Store")
    os.makedirs(tmp_path / ".ipynb_checkpoints")  # a hidden folder is not a class: the folder stays flat
    d = common.load_data(data_args(data=str(tmp_path)))
    assert [os.path.basename(f) for f in d.train.files] == ["a.JPG", "b.webp"] and not d.train.has_labels


def test_val_classes_map_to_train_classes_by_name(tmp_path):
    for c in "abc":
        image(tmp_path / "train" / c / "0.png", seed=ord(c))
    image(tmp_path / "val" / "b" / "0.png")  # val lacks a and c: fine
    image(tmp_path / "val" / "c" / "0.png")
    d = common.load_data(data_args(data=str(tmp_path)))
    assert d.train.classes == d.knn_val.classes == ["a", "b", "c"]
    assert d.knn_val.labels.tolist() == [d.train.classes.index("b"), d.train.classes.index("c")] == [1, 2]
    os.makedirs(tmp_path / "val" / "empty")  # a val class folder without images is no class to match
    assert common.load_data(data_args(data=str(tmp_path))).knn_val.labels.tolist() == [1, 2]
    image(tmp_path / "val" / "d" / "0.png")
    with pytest.raises(common.UserError, match=f"class 'd' of {tmp_path / 'val'} has no folder in "
                                               f"{tmp_path / 'train'}"):
        common.load_data(data_args(data=str(tmp_path)))


def test_class_list_with_val_lacking_a_class(tmp_path):
    for c in "abc":
        image(tmp_path / "train" / c / "0.png", seed=ord(c))
    image(tmp_path / "val" / "c" / "0.png")
    image(tmp_path / "val" / "a" / "0.png")
    (tmp_path / "list.txt").write_text("c\nb\n\nc\n")  # order kept, blank lines and repeats dropped
    d = common.load_data(data_args(data=str(tmp_path), class_list=str(tmp_path / "list.txt")))
    assert d.train.classes == ["c", "b"] and d.knn_val.labels.tolist() == [0]  # val's a: not selected
    (tmp_path / "list.txt").write_text("b\nzz\n")
    with pytest.raises(common.UserError, match="list.txt names classes that folder-train lacks: zz"):
        common.load_data(data_args(data=str(tmp_path), class_list=str(tmp_path / "list.txt")))
    with pytest.raises(common.UserError, match="--class-list selects classes of imagenet"):
        common.load_data(data_args(dataset="cifar10", data=str(tmp_path), class_list=str(tmp_path / "list.txt")))


@pytest.mark.parametrize("dataset", ["folder", "imagenet", "imagenet100", "tinyimagenet", "cifar10", "cifar100",
                                     "stl10"])
def test_data_file_says_what_to_pass(dataset, tmp_path):
    junk(tmp_path / "data.bin")
    for download in (False, True):
        with pytest.raises(common.UserError, match="is a file, not a folder; pass --data DIR, the folder that holds"):
            common.load_data(data_args(dataset=dataset, data=str(tmp_path / "data.bin"), download=download))


def test_tinyimagenet_without_train_says_what_to_pass(tmp_path):
    with pytest.raises(common.UserError, match="train not found; --data must be the tiny-imagenet-200 folder"):
        common.load_data(data_args(dataset="tinyimagenet", data=str(tmp_path)))


def test_small_images_are_named(tmp_path):
    mixed = [image(tmp_path / "big.png", side=120), image(tmp_path / "thin.png", side=120)]
    Image.new("RGB", (64, 7)).save(mixed[1])
    with pytest.raises(common.UserError, match="thin.png is 64x7 px"):
        common._read_rgb(mixed[1])
    assert common._read_rgb(mixed[0]).shape == (3, 120, 120)
    jpeg = image(tmp_path / "small.jpg", side=5, fmt="JPEG")  # torchvision's JPEG path checks too
    with pytest.raises(common.UserError, match="small.jpg is 5x5 px"):
        common._read_rgb(jpeg)
    ok = [image(tmp_path / "ok" / f"{j}.png", side=8) for j in range(2)]  # 8 px is enough
    assert common._maybe_in_memory(common.Source([0, 0], files=ok)).in_memory


def test_training_checkpoint_given_as_backbone_says_what_to_pass(tmp_path, capsys):
    """linear_eval.py and load_backbone take backbone.pth or its run folder; checkpoint.pth is named as such."""
    common.main_base([*map(str, RUN), "--framework", "simclr", "--max-steps", "1", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="is a training checkpoint .* pass its run folder"):
        common.load_backbone(str(tmp_path / "checkpoint.pth"))
    net, meta = common.load_backbone(str(tmp_path))
    assert meta["method"] == "simclr" and isinstance(net, torch.nn.Module)


@pytest.mark.parametrize("flags,phrase", [(["--epochs", "0"], "--epochs 0 is out of range"),
                                          (["--lr", "0.1", "-1"], "--lr 0.1 -1.0 is out of range"),
                                          (["--finetune", "--labels", "1%", "--finetune-lr", "0"], "--finetune-lr 0.0"),
                                          (["--size", "0"], "--size 0 is out of range")])
def test_linear_eval_flags_are_range_checked(flags, phrase, capsys):
    import linear_eval
    with pytest.raises(SystemExit) as e:
        linear_eval.parse(["run", "--dataset", "synthetic", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and phrase in err[0]


# ---------------------------------------------------------------- a folder's settings come from its images

def folder_of(root, sides, classes=2):
    """ImageFolder of noise images, side by side from `sides` (cycled over the images, class by class)."""
    for i, side in enumerate(sides):
        image(root / f"c{i % classes}" / f"{i:03d}.png", side=side, seed=i)
    return str(root)


def resolved(script, root, *flags):
    module = importlib.import_module(script)
    args = module.parse(["--dataset", "folder", "--data", root, *flags])
    data = common.load_data(args)
    common.resolve_data(args, data)
    return args, data


def test_small_folder_takes_the_cifar_row_and_a_queue_below_its_size(tmp_path, capsys):
    """The issue's case: logo.py on a folder of 32 px images got the ImageNet-100 row (ResNet-34, 65,536 keys)."""
    root = folder_of(tmp_path, [32] * 2000)
    args, data = resolved("logo", root)
    cifar = importlib.import_module("logo").parse(["--dataset", "cifar10"])
    assert data.train.in_memory and common.view_size(args, data) == 32
    assert (args.arch, args.stem, args.epochs, args.lr) == (cifar.arch, "cifar", cifar.epochs, cifar.lr)
    assert args.moco_k == 1024 and args.batch_size == 512  # 2,000 images - one batch, a multiple of 2 batches
    assert "cifar10's row" in capsys.readouterr().out
    args, _ = resolved("logo", root, "--arch", "resnet50", "--epochs", "3")  # what is given stays
    assert (args.arch, args.epochs) == ("resnet50", 3)


def test_common_mocov2_default_queue_is_capped_on_a_small_folder(tmp_path):
    root = folder_of(tmp_path, [32] * 300)
    args = common.parse_base(["--dataset", "folder", "--data", root, "--framework", "mocov2", "--batch-size", "64"])
    data = common.load_data(args)
    common.resolve_data(args, data)
    model = common.build_base(args, data).model
    assert len(model.queue.queue) == 128  # 300 images - one batch of 64, rounded down to a multiple of 2 x 64


def test_user_queue_larger_than_the_folder_is_an_error(tmp_path):
    root = folder_of(tmp_path, [32] * 100)
    with pytest.raises(common.UserError, match="--queue-size 4096 holds more keys than the folder's 100 images"):
        resolved("leoclr", root, "--queue-size", "4096", "--batch-size", "16")


def test_varied_folder_is_judged_by_its_median_side_not_its_first_image(tmp_path):
    """Images of 56-60 px (not alike: read from disk) take Tiny ImageNet's row and 64 px views; one 300 px first
    image does not make them ImageNet."""
    root = folder_of(tmp_path, [300] + [56, 60] * 30)
    args, data = resolved("clim", root)
    assert not data.train.in_memory and common.folder_like(data.train) == "tinyimagenet"
    assert common.view_size(args, data) == 64 and args.stem == "cifar"
    big = folder_of(tmp_path / "big", [200, 250] * 5)
    args, data = resolved("clim", big)
    assert common.folder_like(data.train) == "imagenet100" and common.view_size(args, data) == 224
