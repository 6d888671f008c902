"""CO-SSL (CO-BYOL, CO-MoCoV3, CO-DINO): Seeing the Whole in the Parts in Self-Supervised Representation Learning.
Aubret, Teulière, Triesch, arXiv 2501.02860.

Crop invariance and masked modelling both teach a network which features co-occur across the parts of an
image (trunk => tusk). CO-SSL models this directly: every position of the last feature map *before pooling*
(a local representation that sees only part of the image) predicts the other view's *global* representation,
through its own 1x1-conv projector and predictor. That local-to-global term (Eq. 2) is added, weighted, to
BYOL's global term; there is no masking, no multi-crop and no negative. The pooled representation stays the
evaluated one. RF-ResNets (Fig. 2) bound each cell's receptive field so that a "part" is really partial.

Paper -> code:
  BYOL global term, d summed over both directions     global_loss (= 4 + common.byol_loss)
  Eq. 2, local reps predict the other view's target   local_loss, local_distance, byol_distance
  L = (1 - w_s) L_global + w_s L_local                co_ssl_loss
  Fig. 1: heads g, q and local heads g2, q2; EMA      COBYOL (target = EMA of trunk, MLP, g, g2), ema_tau
  Fig. 2: RF-ResNets (RF 99 px R50, 29 px R18)        RF_ARCHS, build_trunk, receptive_field
  Fig. 3(a): crop-scale sweep                          --crop-min-scale
  the family (Table 2): CO-MoCoV3, CO-DINO             --framework mocov3|dino: COMoCoV3 (contrast), CODINO
                                                       (dino_cross_entropy, Prototypes)
  robustness claims (noise, masking, attacks)          linear_eval.py --robustness

    python co_ssl.py --dataset synthetic --epochs 2 --batch-size 32 --stem imagenet --gpus 0      # CPU smoke
    python co_ssl.py --dataset cifar10 --data DIR --download                                      # 1 GPU
    python co_ssl.py --dataset imagenet --data DIR --arch rf_resnet50 --gpus 8                    # 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 co_ssl.py --dataset imagenet --data DIR
    python co_ssl.py --dataset cifar10 --data DIR --baseline          # BYOL, everything else equal
    python co_ssl.py --dataset cifar10 --data DIR --framework dino    # CO-DINO (mocov3: CO-MoCoV3)
    python co_ssl.py --dataset cifar10 --data DIR --show-views        # views + heat maps of the checkpoint in --out
Archs: resnet18, resnet34, resnet50 (y = pooled map) or rf_resnet18 (CIFAR stem, layout 4,4,1,0, RF 29 px),
rf_resnet50 (ImageNet stem, layout 2,2,2,0, RF 99 px), whose y = MLP(pooled map).
"""
import copy, math, os, random, sys, warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ================================================================ losses (fp32)

def byol_distance(a, b):
    """d(a, b) = 2 - 2 cos(a, sg b) along dim 1: 0 aligned, 2 orthogonal, 4 opposite. a [B,D,...], b broadcastable."""
    return 2 - 2 * (F.normalize(a.float(), dim=1) * F.normalize(b.detach().float(), dim=1)).sum(1)


def global_loss(p1, p2, z1, z2):
    """BYOL: d(p1, z'2) + d(p2, z'1), batch means. p, z: B x 256. common.byol_loss is the same minus the constant 4."""
    return 4 + common.byol_loss(p1, p2, z1, z2)


def local_distance(P, t):
    """d between every local prediction P [B,D,h,w] and the global target t [B,D] of its image -> [B,h,w]."""
    return byol_distance(P, t[:, :, None, None])


def local_loss(P1, P2, t1, t2):
    """Eq. 2: every position of view 1 predicts view 2's global target and vice versa; mean over batch and
    positions (not a sum: w_s then does not depend on the grid size)."""
    return local_distance(P1, t2).mean() + local_distance(P2, t1).mean()


def co_ssl_loss(loss_global, loss_local, local_weight):
    """Convex weighting: local_weight 0 is BYOL exactly."""
    return (1 - local_weight) * loss_global + local_weight * loss_local


def ema_tau(progress, base=0.99):
    """BYOL's cosine EMA schedule: base at progress 0 (step k / total K), 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


# ================================================================ RF-ResNets (Fig. 2)

# name -> (torchvision arch, stem, leading 3x3 convs kept per stage (Bottleneck: blocks), the paper's RF in px)
RF_ARCHS = {"rf_resnet18": ("resnet18", "cifar", [4, 4, 1, 0], 29),
            "rf_resnet50": ("resnet50", "imagenet", [2, 2, 2, 0], 99)}


def rf_geometry(trunk):
    """Walk the main path (stem, then each block's convs): rf += (k-1) jump, pad += p jump, jump *= s.
    Cell i of the last map sees input pixels i*stride - pad ... i*stride - pad + rf - 1. -> (rf, stride, pad)."""
    one = lambda v: v if isinstance(v, int) else v[0]
    path = [trunk.conv1, trunk.maxpool] + [getattr(block, name) for stage in (trunk.layer1, trunk.layer2, trunk.layer3,
            trunk.layer4) for block in stage for name in ("conv1", "conv2", "conv3") if hasattr(block, name)]
    rf, jump, pad = 1, 1, 0
    for m in path:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            rf, pad, jump = rf + (one(m.kernel_size) - 1) * jump, pad + one(m.padding) * jump, jump * one(m.stride)
    return rf, jump, pad


def receptive_field(trunk):
    """(receptive field in px, stride in px) of one cell of the pre-pool map."""
    return rf_geometry(trunk)[:2]


def build_trunk(arch, stem, rf_layout=None, rf_mlp=True):
    """A torchvision ResNet, or an RF-ResNet: past the first rf_layout[s] 3x3 convs of stage s every 3x3 conv becomes
    a 1x1 with the same stride (BagNet-style), and an MLP follows pooling (in `fc`, so linear_eval.py rebuilds it)."""
    if arch not in RF_ARCHS:
        return common.build_backbone(arch, stem)
    base, paper_stem, paper_layout, paper_rf = RF_ARCHS[arch]
    layout = list(rf_layout or paper_layout)
    trunk = common.build_backbone(base, stem, rf_layout=layout, rf_mlp=rf_mlp)
    rf, stride = receptive_field(trunk)
    if stem != paper_stem or layout != paper_layout:
        warnings.warn(f"{arch} with the {stem} stem and layout {layout} has a receptive field of {rf} px "
                      f"(stride {stride}), "
                      f"not the paper's {paper_rf} px ({paper_stem} stem, layout {paper_layout})", stacklevel=2)
    return trunk


# ================================================================ model

def conv_mlp(dims):
    """The local heads: Conv1x1-BN2d-ReLU-...-Conv1x1 (biases on), i.e. an MLP applied at every position."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Conv2d(a, b, 1))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class COBYOL(common.Model):
    """Online: trunk (+ RF MLP), g, q, and local g2, q2. Target (EMA, train-mode BN, no grad): trunk, MLP, g, g2.
    local_weight 0 builds no local heads and is BYOL; shared_head applies g, q at every position (target z')."""
    sync_bn = True

    def __init__(self, trunk, pred_hidden, local_weight=0.3, local_target="local", local_grid=0, shared_head=False,
                 tau_base=0.99, proj_hidden=4096, dim=256):
        super().__init__()
        C = trunk.out_dim
        self.local_weight, self.local_target, self.local_grid = local_weight, local_target, local_grid
        self.shared_head, self.tau_base, self.progress = shared_head, tau_base, 0.0
        self.local_heads = local_weight > 0 and not shared_head
        online = {"trunk": trunk, "projector": common.mlp([C, proj_hidden, dim])}      # trunk.fc holds the RF MLP; g
        self.predictor = common.mlp([dim, pred_hidden, dim])                             # q (no target copy)
        if self.local_heads:
            online["local_projector"] = conv_mlp([C, proj_hidden, dim])                  # g2
            self.local_predictor = conv_mlp([dim, pred_hidden, dim])                     # q2
        self.online = nn.ModuleDict(online)
        self.target = copy.deepcopy(self.online).requires_grad_(False)                  # trunk, MLP, g, g2 (xi)

    @property
    def backbone(self):
        return self.online.trunk

    def predict(self, fmap):
        """Online heads on the pre-pool map F [B,C,h,w] -> global prediction p [B,256],
        local predictions P [B,256,n,n]."""
        y = self.online.trunk.fc(fmap.mean((2, 3)))                                      # global representation
        p = self.predictor(self.online.projector(y))
        if self.local_weight == 0:
            return p, None
        grid = F.adaptive_avg_pool2d(fmap, self.local_grid) if self.local_grid else fmap
        if not self.shared_head:
            return p, self.local_predictor(self.online.local_projector(grid))
        B, C, h, w = grid.shape
        P = self.predictor(self.online.projector(grid.permute(0, 2, 3, 1).reshape(B * h * w, C)))
        return p, P.view(B, h, w, -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def targets(self, x):
        """Target pass -> global target z' [B,256] and local target t [B,256]
        (reading A: g2_xi of the pooled target)."""
        y = self.target.trunk(x)                                                         # MLP(mean_ij F'), B x C
        z = self.target.projector(y)
        if self.local_heads and self.local_target == "local":
            return z, self.target.local_projector(y[:, :, None, None]).flatten(1)
        return z, z

    def passes(self, views):
        """Both views through the online heads and the target -> [(p, P, z', t) of view 1, the same of view 2]."""
        return [(*self.predict(common.feature_map(self.online.trunk, x)), *self.targets(x)) for x in views[:2]]

    def forward(self, views, batch=None):
        (p1, P1, z1, t1), (p2, P2, z2, t2) = self.passes(views)
        loss_global = global_loss(p1, p2, z1, z2)
        if self.local_weight == 0:
            return loss_global, {"loss_global": loss_global.detach()}
        loss_local = local_loss(P1, P2, t1, t2)
        return co_ssl_loss(loss_global, loss_local, self.local_weight), {"loss_global": loss_global.detach(),
                                                                         "loss_local": loss_local.detach()}

    def after_step(self):
        common.ema_update(self.target, self.online, ema_tau(self.progress, self.tau_base))

    @torch.no_grad()
    def heat_maps(self, views):
        """cos(P_v[:, :, i, j], t_other) per view -> two [B,h,w] maps (= 1 - d/2); call in eval mode."""
        (_, P1, _, t1), (_, P2, _, t2) = self.passes(views)
        return 1 - local_distance(P1, t2) / 2, 1 - local_distance(P2, t1) / 2


# ================================================================ the family: CO-MoCoV3 and CO-DINO

def contrast(q, k, temperature):
    """MoCo v3's ctr(q, k): InfoNCE of each query (B x D, or B x D x h x w: every position a query of its image)
    against the keys of the whole global batch (positive: the same image), times 2 tau; mean over queries. The keys
    (B x D, this rank's) are gathered without gradient (they come from the momentum encoder)."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(common.gather_no_grad(k.detach().float()), dim=1)
    images = torch.arange(len(q), device=q.device) + len(q) * common.get_rank()       # the positives' rows
    if q.dim() == 4:                                                                    # local queries
        B, D, h, w = q.shape
        q, images = q.permute(0, 2, 3, 1).reshape(B * h * w, D), images.repeat_interleave(h * w)
    return F.cross_entropy(q @ k.T / temperature, images) * 2 * temperature


def dino_cross_entropy(student, teacher, center, student_temp, teacher_temp):
    """DINO Eq. 1 (H(P_t, P_s)): -sum_K softmax((t - c) / tau_t) log softmax(s / tau_s); mean over the rows.
    student: B x K, or B x K x h x w (every position against its image's teacher row t, B x K)."""
    p_t = F.softmax((teacher.detach().float() - center) / teacher_temp, dim=1)
    log_p_s = F.log_softmax(student.float() / student_temp, dim=1)
    if student.dim() == 4:
        p_t = p_t[:, :, None, None]
    return -(p_t * log_p_s).sum(1).mean()


class Prototypes(nn.Module):
    """DINO's last layer with its norm fixed to 1 (norm_last_layer): the cosines of a unit code with K unit prototypes.
    Works on B x D codes and on B x D x h x w maps (every position)."""

    def __init__(self, dim, k):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, dim) * 0.02)

    def forward(self, z):
        w = F.normalize(self.weight, dim=1)
        if z.dim() == 4:
            return torch.einsum("bdhw,kd->bkhw", F.normalize(z, dim=1), w)
        return F.normalize(z, dim=1) @ w.T


class COMoCoV3(COBYOL):
    """CO-MoCoV3 (spec: later extensions): MoCo v3 with a ResNet (query: trunk, 3-layer projector g, predictor q;
    key: momentum trunk and g), ctr in both directions, plus every position's query (1x1-conv g2, q2) contrasted with
    the other view's momentum global keys. local_weight 0 is MoCo v3. The local heads have no momentum copy."""

    def __init__(self, trunk, pred_hidden, local_weight=0.3, temperature=0.2, local_grid=0, tau_base=0.99,
                 proj_hidden=4096, dim=256):
        super().__init__(trunk, pred_hidden, local_weight, "global", local_grid, False, tau_base, proj_hidden, dim)
        self.temperature = temperature
        C = trunk.out_dim   # MoCo v3's ResNet projector: 3 layers, BN after each, the last one without affine
        self.online.projector = common.mlp([C, proj_hidden, proj_hidden, dim], last_bn=True, last_affine=False)
        self.target = copy.deepcopy(nn.ModuleDict({"trunk": self.online.trunk, "projector": self.online.projector}))
        self.target.requires_grad_(False)

    @torch.no_grad()
    def targets(self, x):
        """The momentum key k [B,256] (used as both targets of passes())."""
        k = self.target.projector(self.target.trunk(x))
        return k, k

    def after_step(self):
        tau = ema_tau(self.progress, self.tau_base)
        common.ema_update(self.target.trunk, self.online.trunk, tau)
        common.ema_update(self.target.projector, self.online.projector, tau)

    def forward(self, views, batch=None):
        (q1, Q1, k1, _), (q2, Q2, k2, _) = self.passes(views)
        loss_global = contrast(q1, k2, self.temperature) + contrast(q2, k1, self.temperature)
        if self.local_weight == 0:
            return loss_global, {"loss_global": loss_global.detach()}
        loss_local = contrast(Q1, k2, self.temperature) + contrast(Q2, k1, self.temperature)
        return co_ssl_loss(loss_global, loss_local, self.local_weight), {"loss_global": loss_global.detach(),
                                                                         "loss_local": loss_local.detach()}


class CODINO(common.Model):
    """CO-DINO (spec: later extensions): DINO with a ResNet and two views (student: trunk, head g (MLP to a 256-d
    code), prototypes; teacher: their EMA), plus a 1x1-conv local student head g2 whose code at every position goes
    through the same prototypes and is trained towards the teacher's centred, sharpened global distribution of the
    other view. The centre follows the teacher's global outputs only. local_weight 0 is DINO."""
    sync_bn = True

    def __init__(self, trunk, local_weight=0.3, local_grid=0, tau_base=0.99, prototypes=4096, student_temp=0.1,
                 teacher_temp=0.04, center_momentum=0.9, hidden=2048, dim=256):
        super().__init__()
        C = trunk.out_dim
        self.local_weight, self.local_grid, self.tau_base, self.progress = local_weight, local_grid, tau_base, 0.0
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        online = {"trunk": trunk, "head": common.mlp([C, hidden, hidden, dim]), "prototypes": Prototypes(dim,
                                                                                                            prototypes)}
        self.online = nn.ModuleDict(online)
        self.local_head = conv_mlp([C, hidden, hidden, dim]) if local_weight > 0 else None          # g2 (student only)
        self.target = copy.deepcopy(self.online).requires_grad_(False)                             # the teacher
        self.register_buffer("center", torch.zeros(prototypes))

    @property
    def backbone(self):
        return self.online.trunk

    def student(self, x):
        """-> global logits [B,K], local logits [B,K,n,n] (None without local heads)."""
        fmap = common.feature_map(self.online.trunk, x)
        s = self.online.prototypes(self.online.head(self.online.trunk.fc(fmap.mean((2, 3)))))
        if self.local_head is None:
            return s, None
        grid = F.adaptive_avg_pool2d(fmap, self.local_grid) if self.local_grid else fmap
        return s, self.online.prototypes(self.local_head(grid))

    @torch.no_grad()
    def teacher(self, x):
        return self.target.prototypes(self.target.head(self.target.trunk(x)))

    def forward(self, views, batch=None):
        (s1, S1), (s2, S2) = self.student(views[0]), self.student(views[1])
        t1, t2 = self.teacher(views[0]), self.teacher(views[1])
        H = lambda s, t: dino_cross_entropy(s, t, self.center, self.student_temp, self.teacher_temp)
        loss_global = (H(s1, t2) + H(s2, t1)) / 2
        self.update_center(torch.cat([t1, t2]))
        if self.local_head is None:
            return loss_global, {"loss_global": loss_global.detach()}
        loss_local = (H(S1, t2) + H(S2, t1)) / 2
        return co_ssl_loss(loss_global, loss_local, self.local_weight), {"loss_global": loss_global.detach(),
                                                                         "loss_local": loss_local.detach()}

    @torch.no_grad()
    def update_center(self, teacher):
        """c <- m c + (1 - m) mean of the teacher's global outputs over the global batch (DINO's update_center)."""
        mean = teacher.float().mean(0)
        if common.get_world() > 1:
            torch.distributed.all_reduce(mean)
            mean /= common.get_world()
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)

    def after_step(self):
        common.ema_update(self.target, self.online, ema_tau(self.progress, self.tau_base))

    @torch.no_grad()
    def heat_maps(self, views):
        """Per position, the cosine between the student's local logits and the other view's centred teacher logits
        (1 where the position's prototype profile matches the teacher's global one); call in eval mode."""
        (_, S1), (_, S2) = self.student(views[0]), self.student(views[1])
        t1, t2 = self.teacher(views[0]) - self.center, self.teacher(views[1]) - self.center
        cos = lambda S, t: F.cosine_similarity(S.float(), t.float()[:, :, None, None], dim=1)
        return cos(S1, t2), cos(S2, t1)


class Monitor(common.State):
    """Epoch logs beyond fit's: the EMA tau and, for RF archs, kNN on the pooled map F
    (backbone kNN is on y = MLP(F))."""

    def __init__(self, model, args, data, size):
        self.model, self.args, self.data, self.size, self.epochs_done = model, args, data, size, 0

    def state_dict(self):
        return {"epochs_done": self.epochs_done}

    def load_state_dict(self, state):
        self.epochs_done = state["epochs_done"]

    def epoch_logs(self):
        self.epochs_done += 1
        e, a, logs = self.epochs_done, self.args, {"tau": ema_tau(self.model.progress, self.model.tau_base)}
        if (not isinstance(self.model.backbone.fc, nn.Identity) and a.knn_every and self.data.knn_val is not None
                and (e % a.knn_every == 0 or e == a.epochs)):
            trunk = self.model.backbone
            mlp, trunk.fc = trunk.fc, nn.Identity()  # the trunk without its MLP outputs mean_ij F
            try:
                logs["knn_top1_pooled"] = common.knn_eval(trunk, self.data, a, self.size)[0]
            finally:
                trunk.fc = mlp
            common.print0(f"ep {e}: kNN top-1 on the pooled map (before the RF MLP) {logs['knn_top1_pooled']:.2f}")
        return logs


# ================================================================ defaults and command line

# all rows: LARS (eta 0.02, clipped; 1-D params excluded), 10 warm-up epochs then per-step cosine to 0 [base method]
SMALL = dict(arch="resnet18", epochs=1000, batch_size=256, lr=1.0, wd=1e-5, optimizer="lars", warmup_epochs=10,
             pred_hidden=4096)
IN100 = dict(SMALL, epochs=400, lr=0.5, wd=1e-6, pred_hidden=8192)
IN1K = dict(SMALL, arch="resnet50", stem="imagenet", epochs=100, batch_size=2048, lr=0.45, wd=1e-6)
DEFAULTS = {
    "cifar10": SMALL,                                    # [base method] solo-learn cifar/byol.yaml
    "cifar100": SMALL,                                   # [base method] same file
    "stl10": dict(SMALL, epochs=400),                    # [our choice] CIFAR recipe, ~100k images
    "tinyimagenet": dict(SMALL, epochs=400),             # [our choice] same
    "imagenet100": IN100,                                # [base method] imagenet-100/byol.yaml (128 x 2 GPUs)
    "imagenet": IN1K,                                    # epochs [paper], the rest [base method] imagenet/byol.yaml
    "folder": IN100,                                     # [our choice] an ImageFolder is most often ImageNet-like
    "synthetic": dict(SMALL, epochs=20, warmup_epochs=2),  # [our choice] offline demo, minutes on a CPU
}


def parse(argv=None):
    p = common.base_parser(__doc__)
    a = p.add_argument
    argv = sys.argv[1:] if argv is None else argv
    a("--framework", default="byol", choices=["byol", "mocov3", "dino"], help="base framework: byol (CO-BYOL, the "
      "paper's), mocov3 (CO-MoCoV3) or dino (CO-DINO)")
    a("--temperature", type=float, default=0.2, help="mocov3: InfoNCE temperature (0.2; the loss is scaled by 2 tau)")
    a("--prototypes", type=int, default=4096, help="dino: number of prototypes K (4096; DINO on ImageNet: 65536)")
    a("--student-temp", type=float, default=0.1, help="dino: student temperature (0.1)")
    a("--teacher-temp", type=float, default=0.04, help="dino: teacher temperature (0.04)")
    a("--center-momentum", type=float, default=0.9, help="dino: momentum of the teacher's centre (0.9)")
    a("--local-weight", type=float, default=0.3, help="w_s in L = (1 - w_s) L_global + w_s L_local: 0.3 (paper: "
      "0.2-0.5 work); 0 is BYOL")
    a("--local-target", default="local", choices=["local", "global"], help="target of the local predictions: local = "
      "g2_xi(pooled target) (default), global = z' of the global head")
    a("--local-grid", type=int, default=0, help="0: every position of the final map is a local rep; n > 0: "
      "average-pool the map to n x n first (ablation 1, 2, 4)")
    a("--crop-min-scale", type=float, default=0.08, help="RandomResizedCrop min area fraction (0.08; the paper sweeps "
      "0.08-0.7, best rises as the receptive field shrinks)")
    a("--pred-hidden", type=int, default=None, help="hidden width of both predictors (4096; 8192 on ImageNet-100)")
    a("--tau-base", type=float, default=0.99, help="EMA tau at step 0, cosine to 1 at the end (BYOL: 0.99)")
    a("--rf-layout", default=None, help="rf archs: leading 3x3 convs kept per stage, e.g. 2,2,2,0 "
      "(default: the arch's)")
    a("--no-rf-mlp", action="store_true", help="rf archs: no MLP after pooling (y = pooled map)")
    a("--shared-head", action="store_true", help="ablation: apply g, q at every position (no g2, q2; target z')")
    a("--ckpt", default=None, help="--show-views: checkpoint.pth for the heat maps (default: the one in --out)")
    fw = p.parse_known_args(argv)[0].framework
    args = common.parse(p, DEFAULTS, "co_ssl" if fw == "byol" else f"co_ssl-{fw}", argv)  # its own runs/ folder
    if args.arch not in common.ARCHS + list(RF_ARCHS):
        common.fail(f"unknown --arch '{args.arch}'; choose one of {', '.join(common.ARCHS + list(RF_ARCHS))}")
    if args.arch in RF_ARCHS:
        args.stem = RF_ARCHS[args.arch][1] if args.stem == "auto" else args.stem
        layout = (args.rf_layout or ",".join(map(str, RF_ARCHS[args.arch][2]))).split(",")
        if len(layout) != 4 or not all(v.isdigit() for v in layout):
            common.fail(f"--rf-layout {args.rf_layout} must be 4 non-negative integers, one per stage, e.g. 2,2,2,0")
        args.rf_layout = [int(v) for v in layout]
    elif args.rf_layout or args.no_rf_mlp:
        common.fail(f"--rf-layout and --no-rf-mlp apply to rf_resnet18/rf_resnet50, not --arch {args.arch}")
    if args.baseline:
        args.local_weight = 0.0
    if not 0 <= args.local_weight <= 1 or args.local_grid < 0:
        common.fail("--local-weight must lie in [0, 1] (0.3 recommended) and --local-grid be 0 or a positive side")
    return args


def build(args, data):
    if args.batch_size // (common.get_world() * args.bn_splits) < 2:
        raise common.UserError("the target's g2_xi normalises B pooled vectors: give every process (or BN split) "
                               "at least 2 images via --batch-size")
    size = common.view_size(args, data)
    trunk = build_trunk(args.arch, args.stem, args.rf_layout, not args.no_rf_mlp)
    rf, stride = receptive_field(trunk)
    grid = args.local_grid or math.ceil(size / stride)
    common.print0(f"trunk {args.arch} ({args.stem} stem{', layout ' + str(args.rf_layout) if args.rf_layout else ''}): "
                  f"receptive field {rf} px at stride {stride}; {grid}x{grid} local representations of {size} px views")
    if grid == 1 and args.local_weight > 0:
        common.print0("note: a 1x1 grid makes the local term see the whole view; use the CIFAR stem on small images")
    if args.framework != "byol" and (args.shared_head or args.local_target != "local"):
        raise common.UserError("--shared-head and --local-target are CO-BYOL ablations; drop them with "
                               f"--framework {args.framework}")
    if args.framework == "mocov3":
        model = COMoCoV3(trunk, args.pred_hidden, args.local_weight, args.temperature, args.local_grid, args.tau_base)
    elif args.framework == "dino":
        model = CODINO(trunk, args.local_weight, args.local_grid, args.tau_base, args.prototypes, args.student_temp,
                       args.teacher_temp, args.center_momentum)
    else:
        model = COBYOL(trunk, args.pred_hidden, args.local_weight, args.local_target, args.local_grid,
                       args.shared_head, args.tau_base)
    views = common.two_views((args.crop_min_scale, 1.0))   # two independent RandomResizedCrops, flip 0.5
    recipes = list(common.byol_recipes(blur=common.blurs("co_ssl", size)))  # blur 1.0/0.1, solarize 0/0.2
    return common.Setup(model, common.Views(views, [size, size], recipes), Monitor(model, args, data, size))


def show_views(args, data, setup, path, n=6):
    """One row per image: source with both boxes, view 1, view 2, and per view the heat map of cos(P_v[:, i, j],
    t_other) of a checkpoint (eval mode) over the view, with the centre cell's receptive field for rf archs."""
    if not common.is_main():
        return {}
    from matplotlib.patches import Rectangle
    model, ckpt = setup.model, args.ckpt or os.path.join(args.out, "checkpoint.pth")
    if args.ckpt and not os.path.exists(ckpt):
        raise common.UserError(f"--ckpt {args.ckpt} does not exist; pass a checkpoint.pth written by co_ssl.py")
    loaded = os.path.exists(ckpt)
    if loaded:
        try:
            model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
        except (KeyError, RuntimeError) as e:
            raise common.UserError(f"{ckpt} does not fit this model ({type(e).__name__}); pass the flags it was "
                                   "trained with (--arch, --baseline, --local-*, --pred-hidden) or another --ckpt")
    ds = common.ViewDataset(data.train, setup.views, args.seed)
    idx = random.Random(args.seed).sample(range(len(ds)), min(n, len(ds)))
    batch = torch.utils.data.default_collate([ds[i] for i in idx])
    views = common.device_views(batch, data.train.images if data.train.in_memory else None, data.mean, data.std,
                                setup.views.sizes, torch.device("cpu"))
    maps = model.eval().heat_maps(views) if loaded and model.local_weight > 0 else None
    rf, stride, pad = rf_geometry(model.backbone)
    show_rf = args.arch in RF_ARCHS and not args.local_grid
    why = ("baseline:\nno local heads" if model.local_weight == 0
           else "no checkpoint\nin --out: train\nfirst or pass --ckpt")

    def heat(img, m):  # the cosine map nearest-upsampled over its view, or a note saying why there is none
        def draw(ax):
            if m is None:
                return ax.axis("off"), ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=7,
                                               transform=ax.transAxes, in_layout=False)
            S, (h, w) = img.shape[0], m.shape
            ax.imshow(img)
            im = ax.imshow(m.numpy(), cmap="coolwarm", vmin=-1, vmax=1, alpha=0.6, interpolation="nearest",
                           extent=(-0.5, S - 0.5, S - 0.5, -0.5))
            ax.figure.colorbar(im, cax=ax.inset_axes([1.03, 0, 0.06, 1])).ax.tick_params(labelsize=6)
            if show_rf:  # cell (h//2, w//2) sees input pixels i*stride - pad ... + rf - 1
                top, left = (h // 2) * stride - pad, (w // 2) * stride - pad
                ax.add_patch(Rectangle((left - 0.5, top - 0.5), rf, rf, fill=False, ec="k"))
            ax.set_xticks([]), ax.set_yticks([])
        return draw

    rows = []
    for r, i in enumerate(idx):
        imgs = [common.denormalize(views[k][r], data.mean, data.std) for k in range(2)]
        boxes = [(*batch["boxes"][r, k].tolist(), c, f"v{k + 1}") for k, c in enumerate(["lime", "red"])]
        rows.append([{"img": np.asarray(data.train.pil(i)) / 255.0, "title": f"image {i}", "boxes": boxes}]
                    + [{"img": imgs[k], "title": f"view {k + 1} ({setup.views.sizes[k]} px)"} for k in range(2)]
                    + [{"draw": heat(imgs[k], maps and maps[k][r]), "title": f"cos(P{k + 1}, t{2 - k})"
                        + (f", mean {maps[k][r].mean():.2f}" if maps else "")} for k in range(2)])
    common.save_figure_grid(rows, path, f"CO-SSL ({args.arch}): two views; local-to-global cosine" + (
        f" of {ckpt}" + (f", centre cell RF {rf} px" if show_rf else "") if maps else ""))
    return {"checkpoint": ckpt if loaded else None, "mean_local_cos": [m.mean().item() for m in maps] if maps else None}


def main(argv=None):
    common.main(parse, build, show_views, None, argv)  # solo-learn normalises with the ImageNet constants everywhere


if __name__ == "__main__":
    main()
