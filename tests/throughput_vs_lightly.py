"""tests/throughput_vs_lightly.py: source images per second of common.py's SimCLR and MoCo-v2 against lightly's
example recipes on the same job, run back to back (a script; pytest does not collect it; lightly is not a
dependency: install it beside the project, e.g. `pip install --target DIR lightly`, then run with PYTHONPATH=DIR
after removing DIR's own torch, torchvision, numpy and PIL copies).

The job (the base-frameworks issue's): the 10,000 training images of ../shared/data/cifar10-mini, ResNet-18 with the
ImageNet stem, batch 256, SGD momentum 0.9, lr 0.06, wd 5e-4, RandomResizedCrop scale (0.2, 1), no blur, one process.
lightly: torchvision ImageFolder + its SimCLRTransform (colour strength 0.5) / MoCoV2Transform, 2 DataLoader workers,
its projection heads and NTXentLoss (MoCo: memory bank 4096, momentum 0.99, T 0.2). Ours: the public command line
with its defaults for such a folder (kept in memory, cropped by the training process). Each run times steps 4-15;
the two alternate, `--rounds` times.

    PYTHONPATH=/tmp/lightly_pkgs python tests/throughput_vs_lightly.py --rounds 3
"""
import argparse, copy, os, re, subprocess, sys, tempfile, time

import torch
import torchvision
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-mini")
STEPS, FROM = 15, 4


def lightly_run(framework):
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform, SimCLRTransform
    torch.manual_seed(0)
    simclr = framework == "simclr"
    t = (SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0, min_scale=0.2) if simclr
         else MoCoV2Transform(input_size=32, gaussian_blur=0.0, min_scale=0.2))
    ds = torchvision.datasets.ImageFolder(os.path.join(DATA, "train"), transform=t)
    dl = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=True, num_workers=2, drop_last=True)
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    head = SimCLRProjectionHead(512, 512, 128) if simclr else MoCoProjectionHead(512, 512, 128)
    crit = NTXentLoss(temperature=0.5) if simclr else NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
    net_m, head_m = copy.deepcopy(net), copy.deepcopy(head)
    deactivate_requires_grad(net_m), deactivate_requires_grad(head_m)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.06, momentum=0.9, weight_decay=5e-4)
    n, t0 = 0, None
    for i, ((x0, x1), _) in enumerate(dl):
        if i == FROM - 1:
            t0 = time.perf_counter()
        if simclr:
            loss = crit(head(net(x0)), head(net(x1)))
        else:
            update_momentum(net, net_m, m=0.99), update_momentum(head, head_m, m=0.99)
            with torch.no_grad():
                k = head_m(net_m(x1))
            loss = crit(head(net(x0)), k)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(x0) if i >= FROM - 1 else 0
        if i + 1 == STEPS:
            return n / (time.perf_counter() - t0)


def our_run(framework):
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "common.py"), "--framework", framework, "--dataset", "folder",
               "--data", DATA, "--arch", "resnet18", "--stem", "imagenet", "--epochs", "1", "--batch-size", "256",
               "--lr", "0.06", "--wd", "5e-4", "--crop-min-scale", "0.2", "--knn-every", "0", "--max-steps",
               str(STEPS), "--log-every", "1", "--out", out, "--gpus", "0"]
        cmd += ["--queue-size", "4096"] if framework == "mocov2" else []
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    ips = [float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ .* img/s ([\d.]+)", text)
           if int(m.group(1)) >= FROM]  # each line: the one step since the previous line
    return len(ips) / sum(1 / v for v in ips)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--frameworks", nargs="+", default=["simclr", "mocov2"])
    a = p.parse_args()
    for fw in a.frameworks:
        ours, theirs = [], []
        for _ in range(a.rounds):
            ours.append(our_run(fw))
            theirs.append(lightly_run(fw))
            print(f"{fw}: ours {ours[-1]:.1f} img/s, lightly {theirs[-1]:.1f} img/s", flush=True)
        o, t = sum(ours) / len(ours), sum(theirs) / len(theirs)
        print(f"{fw}: mean ours {o:.1f}, lightly {t:.1f} img/s: {o / t:.2f}x", flush=True)


if __name__ == "__main__":
    main()
