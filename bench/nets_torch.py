"""PyTorch twins of ``bench/conv_nets.py`` (same layers and parameter counts), for
``bench/conv_vs_torch.py`` only. Inputs channels-first (B, 1, D, H, W) / (B, 1, H, W); the
benchmark converts modules and inputs to channels-last memory format."""

from __future__ import annotations

import torch
from torch import nn

N_ANCHORS = 9


class FCN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(1, 64, (3, 5, 5))
        self.pool = nn.MaxPool3d((1, 2, 2))
        self.c2 = nn.Conv3d(64, 64, (3, 5, 5))
        self.c3 = nn.Conv3d(64, 150, (3, 5, 5))
        self.c4 = nn.Conv3d(150, 150, (4, 5, 5))
        self.c5 = nn.Conv3d(150, 2, 1)

    def forward(self, x):
        x = self.pool(torch.relu(self.c1(x)))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        x = torch.relu(self.c4(x))
        return self.c5(x)


class ResUnit(nn.Module):
    def __init__(self, cin, features, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm3d(cin)
        self.conv1 = nn.Conv3d(cin, features, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(features)
        self.conv2 = nn.Conv3d(features, features, 3, 1, 1, bias=False)
        self.proj = (nn.Conv3d(cin, features, 1, stride, bias=False)
                     if stride != 1 or cin != features else None)

    def forward(self, x):
        h = torch.relu(self.bn1(x))
        shortcut = self.proj(h) if self.proj is not None else x
        h = self.conv1(h)
        h = self.conv2(torch.relu(self.bn2(h)))
        return h + shortcut


class FPR(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(1, 32, 3, 1, 1, bias=False)
        units, cin = [], 32
        for f, s in ((32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1)):
            units.append(ResUnit(cin, f, s))
            cin = f
        self.units = nn.Sequential(*units)
        self.bn = nn.BatchNorm3d(128)
        self.fc = nn.Linear(128, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.units(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3, 4)))


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(1, 24, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm3d(24)
        self.r2 = ResUnit(24, 32, 2)
        self.r3 = ResUnit(32, 64, 2)
        self.r4 = ResUnit(64, 128, 2)
        self.l4 = nn.Conv3d(128, 64, 1)
        self.l3 = nn.Conv3d(64, 64, 1)
        self.l2 = nn.Conv3d(32, 64, 1)
        self.up4 = nn.ConvTranspose3d(64, 64, 2, 2)
        self.up3 = nn.ConvTranspose3d(64, 64, 2, 2)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv3d(64, 64, 3, 1, 1), nn.ReLU(), nn.Conv3d(64, N_ANCHORS * 5, 1))
            for _ in range(2))

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        c2 = self.r2(x)
        c3 = self.r3(c2)
        c4 = self.r4(c3)
        p4 = self.l4(c4)
        p3 = self.l3(c3) + self.up4(p4)
        p2 = self.l2(c2) + self.up3(p3)
        return [h(p) for h, p in zip(self.heads, (p2, p3))]


class DoubleConv(nn.Sequential):
    def __init__(self, cin, features):
        super().__init__(
            nn.Conv2d(cin, features, 3, 1, 1, bias=False), nn.BatchNorm2d(features), nn.ReLU(),
            nn.Conv2d(features, features, 3, 1, 1, bias=False), nn.BatchNorm2d(features), nn.ReLU())


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        chans = (64, 128, 256, 512)
        self.down = nn.ModuleList()
        cin = 1
        for f in chans:
            self.down.append(DoubleConv(cin, f))
            cin = f
        self.mid = DoubleConv(512, 1024)
        self.ups = nn.ModuleList()
        self.dec = nn.ModuleList()
        cin = 1024
        for f in reversed(chans):
            self.ups.append(nn.ConvTranspose2d(cin, f, 2, 2))
            self.dec.append(DoubleConv(2 * f, f))
            cin = f
        self.out = nn.Conv2d(64, 2, 1)

    def forward(self, x):
        skips = []
        for d in self.down:
            x = d(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.mid(x)
        for up, dec, skip in zip(self.ups, self.dec, reversed(skips)):
            x = dec(torch.cat([skip, up(x)], dim=1))
        return self.out(x)


class Dou2017FPR(nn.Module):
    """``lungjax.models.fp_reduction.Dou2017FPR`` (ResNet+HL): VALID trunk convolutions,
    pre-activation residual units, classification and regression heads over flattened features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 64, (3, 5, 5))
        self.conv2 = nn.Conv3d(64, 64, (3, 5, 5))
        self.conv3 = nn.Conv3d(64, 150, (3, 5, 5))
        self.conv4 = nn.Conv3d(150, 64, 3)
        self.res1 = _PreActUnit(64)
        self.bn1 = nn.BatchNorm3d(64)
        self.conv5 = nn.Conv3d(64, 128, 3, 2)
        self.res2 = _PreActUnit(128)
        self.bn2 = nn.BatchNorm3d(128)
        self.cls = nn.Sequential(nn.Linear(128 * 3 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 2))
        self.reg_conv = nn.Conv3d(64, 32, 3, 2)
        self.reg = nn.Sequential(nn.Linear(32 * 7 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 4))

    def forward(self, x):
        h = torch.max_pool3d(torch.relu(self.conv1(x)), (1, 2, 2))
        h = torch.relu(self.conv3(torch.relu(self.conv2(h))))
        shared = torch.relu(self.bn1(self.res1(self.conv4(h))))
        c = torch.relu(self.bn2(self.res2(self.conv5(shared))))
        logits = self.cls(torch.max_pool3d(c, 2).flatten(1))
        r = torch.relu(self.reg_conv(shared))
        return [logits, self.reg(r.flatten(1))]


class _PreActUnit(nn.Module):
    """x + conv(relu(bn(conv(relu(bn(x)))))), 3x3x3 SAME convolutions with bias."""

    def __init__(self, features):
        super().__init__()
        self.bn1 = nn.BatchNorm3d(features)
        self.conv1 = nn.Conv3d(features, features, 3, 1, 1)
        self.bn2 = nn.BatchNorm3d(features)
        self.conv2 = nn.Conv3d(features, features, 3, 1, 1)

    def forward(self, x):
        h = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(h)))


NETS = {"fcn": FCN, "fpr": FPR, "det": Detector, "unet": UNet, "dou2017_fpr": Dou2017FPR}


def loss_fn(out, target):
    """Mean squared error against a fixed random target (list outputs: summed)."""
    if isinstance(out, (list, tuple)):
        return sum(torch.mean((o - t) ** 2) for o, t in zip(out, target))
    return torch.mean((out - target) ** 2)


def train_step(name: str, shape, batch: int):
    """The torch side of the benchmarks' train step for network ``name``: channels-last
    module and input (``shape`` channels-last, as ``conv_nets.NETS``), MSE ``loss_fn``
    against a fixed random target, Adam.

    Returns:
      (run, model): ``run()`` does one step (forward + backward + optimiser update).
    """
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if len(shape) == 4 else torch.channels_last
    model = NETS[name]().to(memory_format=fmt).train()
    x = torch.randn(batch, shape[-1], *shape[:-1]).contiguous(memory_format=fmt)
    with torch.no_grad():
        out = model(x)
    target = ([torch.randn_like(o) for o in out] if isinstance(out, list)
              else torch.randn_like(out))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def run():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        opt.step()

    return run, model
