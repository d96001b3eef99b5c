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


# ---------------------------------------------------------------------------------
# sathish2020 (``lungjax.models.sathish2020``): U-Net, SUMNet, Turing-test discriminator
# ---------------------------------------------------------------------------------


class ConvBNReLU(nn.Sequential):
    """3x3 conv (bias) -> BN -> ReLU, SAME padding."""

    def __init__(self, cin, features):
        super().__init__(nn.Conv2d(cin, features, 3, 1, 1), nn.BatchNorm2d(features), nn.ReLU())


class SathishUNet(nn.Module):
    """``sathish2020_unet``: blocks of two ConvBNReLU, 2x max-pools, nearest x2
    up-sampling + ConvBNReLU, skip first in the concatenation, 1x1 head (2 classes)."""

    def __init__(self, widths=(64, 128, 256, 512, 1024)):
        super().__init__()
        self.enc = nn.ModuleList()
        cin = 1
        for f in widths:
            self.enc.append(nn.Sequential(ConvBNReLU(cin, f), ConvBNReLU(f, f)))
            cin = f
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.up.append(ConvBNReLU(widths[i], widths[i - 1]))
            self.dec.append(nn.Sequential(ConvBNReLU(2 * widths[i - 1], widths[i - 1]),
                                          ConvBNReLU(widths[i - 1], widths[i - 1])))
        self.head = nn.Conv2d(widths[0], 2, 1)

    def forward(self, x):
        skips = []
        for i, enc in enumerate(self.enc):
            if i:
                x = nn.functional.max_pool2d(x, 2)
            x = enc(x)
            skips.append(x)
        for k, (up, dec) in enumerate(zip(self.up, self.dec)):
            x = up(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
            x = dec(torch.cat([skips[-2 - k], x], dim=1))
        return self.head(x)


class SUMNet(nn.Module):
    """``sathish2020_sumnet``: 1x1 conv to 3 channels + ReLU, the VGG11-BN encoder
    (max-pools returning their indices), a decoder that unpools with them, concatenates
    the encoder's pre-pool feature and applies 3x3 conv + ReLU, and a 1x1 head."""

    ENC = ((64, True), (128, True), (256, False), (256, True), (512, False), (512, True),
           (512, False), (512, True))
    DEC = ((512, 512), (512, 256), (256, 128), (64,), (32,))

    def __init__(self):
        super().__init__()
        self.preconv = nn.Conv2d(1, 3, 1)
        self.enc, cin, skips = nn.ModuleList(), 3, []
        for f, pool in self.ENC:
            self.enc.append(ConvBNReLU(cin, f))
            cin = f
            if pool:
                skips.append(f)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.dec = nn.ModuleList()
        for level, widths in enumerate(self.DEC):
            cin = cin + skips[4 - level]
            convs = []
            for f in widths:
                convs += [nn.Conv2d(cin, f, 3, 1, 1), nn.ReLU()]
                cin = f
            self.dec.append(nn.Sequential(*convs))
        self.head = nn.Conv2d(cin, 2, 1)

    def forward(self, x):
        x = torch.relu(self.preconv(x))
        skips, indices = [], []
        for conv, (_, pool) in zip(self.enc, self.ENC):
            x = conv(x)
            if pool:
                skips.append(x)
                x, idx = self.pool(x)
                indices.append(idx)
        for level, dec in enumerate(self.dec):
            s = 4 - level
            x = dec(torch.cat([self.unpool(x, indices[s]), skips[s]], dim=1))
        return self.head(x)


class Turing(nn.Module):
    """``sathish2020_turing``: bias-free unpadded 3x3 convs with LeakyReLU 0.2 (BN after
    conv2-5), max-pools ``pools``, a ``final`` x ``final`` conv to 2 channels, LeakyReLU,
    spatial mean -> (B, 2) logits."""

    def __init__(self, f=64, pools=(2, 2, 2, 2), final=7):
        super().__init__()
        p1, p2, p3, p4 = pools

        def pool(p):
            return nn.MaxPool2d(p) if p > 1 else nn.Identity()

        def block(cin, cout, bn):
            return [nn.Conv2d(cin, cout, 3, bias=False)] + \
                ([nn.BatchNorm2d(cout)] if bn else []) + [nn.LeakyReLU(0.2)]

        self.body = nn.Sequential(
            *block(2, f, False), pool(p1), *block(f, 2 * f, True), pool(p2),
            *block(2 * f, 2 * f, True), *block(2 * f, 4 * f, True), pool(p3),
            *block(4 * f, 4 * f, True), pool(p4),
            nn.Conv2d(4 * f, 2, final, bias=False), nn.LeakyReLU(0.2))

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))


class SumNetAdversarial(nn.Module):
    """Both networks of the adversarial stage (one module, so the parameters count
    together)."""

    def __init__(self):
        super().__init__()
        self.segmenter = SUMNet()
        self.discriminator = Turing()


def _turing_pairs(truth, pred):
    """(B, 2, H, W) pairs with the truth in channel 0 where labels[:, 0] == 1, and the
    (B, 2) labels; the channel order drawn per slice (``lungjax.methods.sathish2020``)."""
    first = (torch.rand(truth.shape[0]) < 0.5)
    sel = first[:, None, None]
    pairs = torch.stack([torch.where(sel, truth, pred), torch.where(sel, pred, truth)], dim=1)
    g = first.float()
    return pairs.contiguous(memory_format=torch.channels_last), torch.stack([g, 1 - g], -1)


def adversarial_step(shape, batch: int, alpha: float = 0.001):
    """sathish2020's alternating step: one discriminator update on a shuffled
    {truth, prediction} pair (BCE), then one segmenter update on J_seg - alpha J_adv
    (J_seg the 2-class cross entropy), Adam 1e-4 each, as ``lungjax.methods.sathish2020``.

    Returns:
      (run, model).
    """
    torch.manual_seed(0)
    fmt = torch.channels_last
    model = SumNetAdversarial().to(memory_format=fmt).train()
    seg, disc = model.segmenter, model.discriminator
    x = torch.rand(batch, 1, *shape[:-1]).contiguous(memory_format=fmt)
    truth = (torch.rand(batch, *shape[:-1]) < 0.3).float()
    s_opt = torch.optim.Adam(seg.parameters(), lr=1e-4)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-4)
    bce = nn.functional.binary_cross_entropy_with_logits

    def run():
        with torch.no_grad():
            pred = torch.softmax(seg(x), dim=1)[:, 1]
        pairs, labels = _turing_pairs(truth, pred)
        d_opt.zero_grad(set_to_none=True)
        bce(disc(pairs), labels).backward()
        d_opt.step()
        disc.requires_grad_(False)  # the segmenter's update differentiates its own only
        s_opt.zero_grad(set_to_none=True)
        out = seg(x)
        j_seg = nn.functional.cross_entropy(out, truth.long())
        pairs, labels = _turing_pairs(truth, torch.softmax(out, dim=1)[:, 1])
        (j_seg - alpha * bce(disc(pairs), labels)).backward()
        s_opt.step()
        disc.requires_grad_(True)

    return run, model


class YuResidualUnit(nn.Module):
    """``lungjax.models.yu2021.ResidualUnit``: conv3-IN-ReLU, conv3-IN, + shortcut
    (identity, or a 1x1x1 conv with bias when the channels change), ReLU."""

    def __init__(self, cin, features):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, features, 3, 1, 1)
        self.norm1 = nn.InstanceNorm3d(features, eps=1e-5, affine=True)
        self.conv2 = nn.Conv3d(features, features, 3, 1, 1)
        self.norm2 = nn.InstanceNorm3d(features, eps=1e-5, affine=True)
        self.proj = nn.Conv3d(cin, features, 1) if cin != features else None

    def forward(self, x):
        h = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
        return torch.relu(h + (self.proj(x) if self.proj is not None else x))


class ResUNet3D(nn.Module):
    """yu2021's 3D Res U-Net (``res_unet3d``): four residual down modules with 2x2x2
    max-pools, a bottom unit, four 2x2x2 stride-2 transposed convs + concatenation +
    residual unit, a 1x1x1 conv to one logit."""

    def __init__(self, base=32):
        super().__init__()
        widths = [base * 2 ** i for i in range(4)]
        cins = [1] + widths[:3]
        self.down = nn.ModuleList(YuResidualUnit(c, w) for c, w in zip(cins, widths))
        self.pool = nn.MaxPool3d(2)
        self.bottom = YuResidualUnit(widths[3], base * 16)
        ups = [base * 16] + widths[:0:-1]
        self.upconv = nn.ModuleList(nn.ConvTranspose3d(c, w, 2, 2)
                                    for c, w in zip(ups, widths[::-1]))
        self.up = nn.ModuleList(YuResidualUnit(2 * w, w) for w in widths[::-1])
        self.out = nn.Conv3d(base, 1, 1)

    def forward(self, x):
        skips = []
        for unit in self.down:
            x = unit(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for upconv, unit, skip in zip(self.upconv, self.up, reversed(skips)):
            x = unit(torch.cat([upconv(x), skip], dim=1))
        return self.out(x)


class Bottleneck3D(nn.Module):
    """``lungjax.models.yu2021.Bottleneck3D``: 1x1x1 -> k (stride) -> 1x1x1 (4 x width),
    BN-ReLU, projection (1x1x1 conv + BN) on a change of stride or width."""

    def __init__(self, cin, width, stride, kernel):
        super().__init__()
        out = 4 * width
        pad = tuple(k // 2 for k in kernel)
        self.conv1 = nn.Conv3d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, kernel, stride, pad, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.proj = (nn.Sequential(nn.Conv3d(cin, out, 1, stride, bias=False),
                                   nn.BatchNorm3d(out))
                     if cin != out or stride != 1 else None)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return torch.relu(h + (self.proj(x) if self.proj is not None else x))


class ResNet3D(nn.Module):
    """yu2021's 3D ResNet50 (``resnet50_3d``, the paper's version): 3x3x3 stride-1 stem,
    no pooling, stages 3-4-6-3 of widths 64-128-256-512 with strides 1-2-2-2 and (1, 3, 3)
    middle kernels in the last two, global average pool, dense 2."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(1, 64, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm3d(64)
        blocks, cin = [], 64
        for n, w, st, k in zip((3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2),
                               ((3, 3, 3), (3, 3, 3), (1, 3, 3), (1, 3, 3))):
            for b in range(n):
                blocks.append(Bottleneck3D(cin, w, st if b == 0 else 1, k))
                cin = 4 * w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, 2)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(x.mean(dim=(2, 3, 4)))


NETS = {"fcn": FCN, "fpr": FPR, "det": Detector, "unet": UNet, "dou2017_fpr": Dou2017FPR,
        "sathish_unet": SathishUNet, "res_unet3d": ResUNet3D, "resnet50_3d": ResNet3D}
STEPS = {"sumnet_adv": adversarial_step}


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
    if name in STEPS:
        return STEPS[name](shape, batch)
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
