"""Parameter and FLOP counts of the Sathish et al. (EMBC 2020) networks next to the paper's.

    python bench/sathish2020_counts.py

Counted by ``lungjax.models.flops`` (the rules of the ``thop`` counter the paper used) at
the paper's input sizes: 512x512 slices for the segmenters and the discriminator (a
2x512x512 mask pair), 64x64 patches for the LeNet. Nothing is computed: the models are
traced under ``jax.eval_shape``.
"""

from __future__ import annotations

import numpy as np

from lungjax.models import flops
from lungjax.models import sathish2020 as s

SLICE = (1, 512, 512, 1)

# (name, model, input shape, paper params, paper FLOPs (None = not reported))
ROWS = (
    ("U-Net", s.UNet(), SLICE, 34_525_952, "261.901G"),
    ("R2U-Net (t=2)", s.R2UNet(), SLICE, 39_091_328, "612.076G"),
    ("SUMNet", s.SUMNet(), SLICE, 23_863_336, "153.539G"),
    ("discriminator", s.TuringDiscriminator(), (1, 512, 512, 2), None, None),
    ("LeNet", s.LeNet(), (1, 64, 64, 1), 50_162, "2,796,448"),
)


def main() -> None:
    print(f"{'network':<15} {'params':>12} {'paper':>12} {'FLOPs':>17} {'paper':>10}")
    costs = {}
    for name, model, shape, p_params, p_flops in ROWS:
        c = flops.layer_costs(model, shape)
        costs[name] = c
        n_params = sum(x.params for x in c)
        n_flops = sum(x.flops for x in c)
        print(f"{name:<15} {n_params:>12,} {(f'{p_params:,}' if p_params else '-'):>12} "
              f"{n_flops:>17,} {p_flops or '-':>10}")
    sumnet = sum(x.params for x in costs["SUMNet"])
    disc = sum(x.params for x in costs["discriminator"])
    print(f"{'SUMNet + disc.':<15} {sumnet + disc:>12,} {24_997_032:>12,}")
    twice = flops.count_flops(s.SUMNet(), SLICE, repeat={"encoder": 2})
    encoder = sum(x.flops for x in costs["SUMNet"] if x.path.startswith("encoder/"))
    print(f"\nSUMNet FLOPs with the VGG encoder charged twice: {twice:,} (the paper's "
          f"153.539G);\n  the true cost is {sum(x.flops for x in costs['SUMNet']):,}: the "
          "authors' SUMNet registers the VGG11-BN feature modules both under `encoder` and "
          "as\n  conv1 .. bn8, so `thop` hooked each of them twice and charged the encoder "
          f"({encoder:,} FLOPs) twice.")
    print("\nWhy the paper's U-Net / R2U-Net parameter counts end in ...952 / ...328: "
          "`thop` kept\neach module's count in a float32 tensor and summed them in float32; "
          "above 2**25 float32\nholds only multiples of 4, and the true totals round (half "
          "to even) down:")
    for name in ("U-Net", "R2U-Net (t=2)"):
        per_layer = [x.params for x in costs[name]]
        exact = sum(per_layer)
        print(f"  {name:<14} exact {exact:,}; float32 running sum over its "
              f"{len(per_layer)} layers = {flops.float32_sum(per_layer):,}; "
              f"float32({exact:,}) = {int(np.float32(exact)):,}")


if __name__ == "__main__":
    main()
