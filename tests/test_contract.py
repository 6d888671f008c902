"""The training contract every method script follows (common.py's docstring): Setup(model, views, state), one
scaffold (common.main), --baseline in its own folder naming its base framework, generic save/restore."""
import importlib, json, os

import pytest
import torch
import torch.nn as nn

from conftest import TINY
import common

SCRIPTS = {"logo": "simsiam", "co_ssl": "byol", "contrastive_crop": "mocov2", "leoclr": "mocov2", "clim": "mocov2"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_baseline_has_its_own_folder_and_names_its_framework(name):
    mod = importlib.import_module(name)
    plain, base = (mod.parse(["--dataset", "synthetic", *flag]) for flag in ([], ["--baseline"]))
    assert (plain.method, plain.out) == (name, os.path.join("runs", f"{name}-synthetic"))
    assert (base.method, base.out) == (f"{name}-baseline", os.path.join("runs", f"{name}-baseline-synthetic"))
    assert base.framework == SCRIPTS[name]


def test_common_py_rejects_baseline(capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_base(["--framework", "simclr", "--baseline"])
    assert e.value.code == 2 and "--baseline" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(SCRIPTS) + ["simclr"])
def test_build_returns_the_contract(name):
    """build(args, data) -> Setup whose model is a common.Model, views a common.Views (picklable crops), state a
    common.State or None; the loop reads nothing else."""
    flags = ["--dataset", "synthetic", "--subset", "32", "--batch-size", "16", "--stem", "imagenet"]
    if name == "simclr":
        args, build = common.parse_base(["--framework", "simclr", *flags]), common.build_base
    else:
        mod = importlib.import_module(name)
        extra = {"leoclr": ["--queue-size", "64"], "clim": ["--queue-size", "64", "--clusters", "4"]}.get(name, [])
        args, build = mod.parse(flags + extra), mod.build
    args.device = torch.device("cpu")
    data = common.load_data(args)
    common.resolve_data(args, data)
    setup = build(args, data)
    assert isinstance(setup, common.Setup) and isinstance(setup.model, common.Model)
    assert isinstance(setup.views, common.Views) and len(setup.views.sizes) == len(setup.views.recipes)
    assert setup.state is None or isinstance(setup.state, common.State)
    assert isinstance(setup.model.backbone, nn.Module) and setup.model.param_groups()
    crops = setup.views.crops(0, [(32, 32)], common.sample_rng(0, 0, 0))
    assert len(crops) == len(setup.views.sizes) and all(isinstance(c, common.Crop) for c in crops)


class Counter(common.State):
    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_save_and_restore_named_objects(tmp_path):
    """Whatever is named in save() comes back through restore(); None is skipped; plain values stay as they are."""
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    a(torch.randn(4, 3)).sum().backward()
    opt_a.step()
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    sa, sb = Counter(), Counter()
    sa.n = 7
    path = str(tmp_path / "ck.pth")
    common.save(path, model=a, optimizer=opt_a, state=sa, step=5, nothing=None)
    ck = torch.load(path, weights_only=False)
    assert ck["step"] == 5 and ck["nothing"] is None
    common.restore(ck, model=b, optimizer=opt_b, state=sb, nothing=None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert opt_b.state_dict()["state"][0]["momentum_buffer"].equal(opt_a.state_dict()["state"][0]["momentum_buffer"])
    assert sb.n == 7


def test_show_views_writes_views_png_for_a_base_framework(tmp_path, capsys):
    common.main_base([*map(str, TINY), "--framework", "byol", "--show-views", "--out", str(tmp_path)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["views"] == str(tmp_path / "views.png") and os.path.getsize(out["views"]) > 0
    assert out["method"] == out["framework"] == "byol" and not (tmp_path / "checkpoint.pth").exists()
