"""Normalisation constants: each script trains with its official code's constants where that code covers the dataset
(common.with_stats after load_data; README's "Normalisation constants" rows), load_data's defaults elsewhere."""
import functools, importlib

import pytest
import torch

from conftest import TINY
import common

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))      # load_data's default
CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))     # load_data's default
CIFAR_COMMON = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # MoCo demo, LoGo loader.py, ContrastiveCrop
CCROP = {"cifar10": CIFAR_COMMON,                                      # ContrastiveCrop configs/small/<dataset>/*.py
         "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
         "stl10": ((0.4406, 0.4273, 0.3858), (0.2312, 0.2265, 0.2237)),
         "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
         "imagenet": IMAGENET}


class Built(Exception):
    """Raised by the stand-in build: the run stops once it has handed its Data over."""


def fake_load_data(args):
    """load_data without files: 4 blank 32 px images, the dataset's default constants (as load_data picks them)."""
    src = common.Source([0, 1, 2, 3], images=torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    return common.Data(src, src, src, *common.DATASETS[args.dataset]["stats"])


def stats_run_uses(monkeypatch, script, dataset):
    """(mean, std) of the Data that script's run() builds its method on. script: a method file or a base framework."""
    seen = []

    def build(args, data):
        seen.append((data.mean, data.std))
        raise Built

    monkeypatch.setattr(common, "load_data", fake_load_data)
    argv = ["--dataset", dataset, "--data", "unused"]
    if script in ("simclr", "mocov2", "byol", "simsiam"):
        monkeypatch.setattr(common, "build_base", build)
        run = functools.partial(common.main_base, ["--framework", script] + argv)
    else:
        mod = importlib.import_module(script)
        monkeypatch.setattr(mod, "build", build)
        run = functools.partial(mod.main, argv)
    with pytest.raises(Built):
        run()
    return seen[0]


@pytest.mark.parametrize("script,dataset,expected", [
    *[("contrastive_crop", d, s) for d, s in CCROP.items()],  # every dataset of the official configs
    ("logo", "cifar10", CIFAR_COMMON), ("logo", "cifar100", CIFAR100),  # loader.py covers CIFAR-10 only
    ("leoclr", "cifar10", CIFAR_COMMON), ("leoclr", "stl10", IMAGENET),  # the MoCo demo covers CIFAR-10 only
    ("mocov2", "cifar10", CIFAR_COMMON), ("simclr", "cifar10", CIFAR10),  # base frameworks: the MoCo demo
    ("co_ssl", "cifar10", CIFAR10), ("clim", "cifar10", CIFAR10), ("clim", "imagenet", IMAGENET)])
def test_run_normalises_with_the_official_constants(monkeypatch, script, dataset, expected):
    mean, std = stats_run_uses(monkeypatch, script, dataset)
    assert mean == pytest.approx(expected[0], abs=0) and std == pytest.approx(expected[1], abs=0)


def test_with_stats():
    data = common.Data(None, None, None, *CIFAR10)
    assert common.with_stats(data, None) is data
    assert common.with_stats(data, [list(CIFAR_COMMON[0]), list(CIFAR_COMMON[1])]) == (None, None, None, *CIFAR_COMMON)


def test_backbone_records_its_normalisation(tmp_path):
    """backbone.pth carries the constants the backbone was trained with, for evaluation to reuse."""
    common.main_base(TINY + ["--framework", "simclr", "--epochs", "1", "--subset", "4", "--batch-size", "4",
                             "--out", str(tmp_path)])  # 1 step
    meta = torch.load(tmp_path / "backbone.pth", map_location="cpu", weights_only=False)
    assert (tuple(meta["mean"]), tuple(meta["std"])) == common.DATASETS["synthetic"]["stats"]


def test_linear_eval_normalises_as_the_backbone_was_trained(monkeypatch, tmp_path):
    """linear_eval.py feeds each backbone the constants stored in its backbone.pth (files without them: the
    defaults)."""
    import linear_eval
    net = common.build_backbone("resnet18", "imagenet")
    common.export_backbone(net, str(tmp_path / "demo.pth"), method="mocov2", mean=list(CIFAR_COMMON[0]),
                           std=list(CIFAR_COMMON[1]))
    common.export_backbone(net, str(tmp_path / "old.pth"), method="mocov2")
    seen = []
    monkeypatch.setattr(linear_eval, "evaluate", lambda net, data, args, size: seen.append((data.mean, data.std)) or {})
    monkeypatch.setattr(linear_eval, "report", lambda results, args: None)
    args = linear_eval.parse([str(tmp_path / "demo.pth"), str(tmp_path / "old.pth"), "--dataset", "synthetic",
                              "--subset", "64", "--knn-only"])
    args.device = torch.device("cpu")
    linear_eval.run(args)
    assert seen == [CIFAR_COMMON, common.DATASETS["synthetic"]["stats"]]
