"""What a cross-validation of every method on its ``paper`` schedule costs on accelerators.

For each method's ``paper`` config and each of its training stages (and every
cross-validation variant's own retrained stages, as ``--mode=cv`` runs them): the FLOPs
of one training step from XLA's cost analysis of the network's forward pass at the
stage's patch shape and batch (x 3 for forward + backward, the usual estimate; a further
network trained in the same step, e.g. sathish2020's discriminator, x 6: its own update
and the segmenter's pass through it), times the schedule's steps and the folds. Chip time
is that over a chip's dense bf16 peak at an assumed model-FLOPs utilisation; patches/s per
chip the same figure per patch. Nothing is trained: the networks are only lowered.

    python bench/cluster_cost.py [--folds 10] [--mfu 0.35] [--methods dou2017,xie2018]

Peaks used (dense, bf16, per chip): TPU v5e 197 TFLOP/s, H100 SXM 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from lungjax import stages  # noqa: E402
from lungjax import train as train_lib  # noqa: E402
from lungjax.configcheck import as_dict  # noqa: E402
from lungjax.registry import MODELS  # noqa: E402

METHODS = ("dou2017", "xie2018", "sathish2020", "shrey2020", "yu2021")
CHIPS = {"TPU v5e": 197e12, "H100": 989e12}


def load(method: str):
    spec = importlib.util.spec_from_file_location(method, os.path.join(ROOT, "configs",
                                                                       f"{method}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("paper")


def forward_flops(model, shape) -> float:
    """XLA's FLOP count of ``model.apply`` on a zero input of ``shape`` (inference mode)."""
    x = jnp.zeros(shape, jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def stage_step_flops(cfg) -> tuple[float, float]:
    """(FLOPs of one training step, FLOPs per patch) of a "train" stage's config."""
    b = int(cfg.train.batch_size)
    size = tuple(int(s) for s in cfg.data.patch_size_zyx)
    flops = 3 * forward_flops(train_lib.build_model(cfg), (1, *size, 1))
    for extra in as_dict(cfg.networks).values():  # adversaries and the like
        model = MODELS.build(config_dict.ConfigDict(extra["model"]))
        flops += 6 * forward_flops(model, (1, *size, int(extra.get("input_channels", 1))))
    return flops * b, flops


def trained_stages(config) -> list[tuple[str, str, object]]:
    """(variant, stage, stage config) of every training a fold runs: the method's train
    stages, then each cv variant's stages whose fingerprint differs (the others are
    shared, as ``lungjax.stages`` shares them)."""
    specs = dict(stages.stage_specs(config))
    main_fp = {n: stages.fingerprint(config, n, specs) for n in specs}
    out = [("", n, stages.stage_config(config, n, s)) for n, s in specs.items()
           if s["kind"] == "train"]
    for v in config.cv.variants:
        vcfg = stages.variant_config(config, v)
        vspecs = dict(stages.stage_specs(vcfg))
        until = str(as_dict(config.cv.variants[v]).get("until", ""))
        for n, s in vspecs.items():
            if s["kind"] == "train" and stages.fingerprint(vcfg, n, vspecs) != main_fp.get(n):
                out.append((v, n, stages.stage_config(vcfg, n, s)))
            if n == until:
                break
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--mfu", type=float, default=0.35,
                   help="assumed fraction of the chip's peak the training steps reach")
    p.add_argument("--methods", default=",".join(METHODS))
    a = p.parse_args(argv)
    chips = list(CHIPS)
    print("| method | variant | stage | network | batch x patch | steps | TFLOP/step | "
          "PFLOP per fold | " + " | ".join(f"{c} patches/s" for c in chips) + " |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(chips))
    totals = {}
    for m in a.methods.split(","):
        config = load(m)
        total = 0.0
        for variant, name, cfg in trained_stages(config):
            step, per_patch = stage_step_flops(cfg)
            steps = int(cfg.train.num_steps)
            total += step * steps
            rates = [CHIPS[c] * a.mfu / per_patch for c in chips]
            print(f"| {m} | {variant or '(method)'} | {name} | {cfg.model.name} | "
                  f"{int(cfg.train.batch_size)} x {tuple(cfg.data.patch_size_zyx)} | {steps:,} | "
                  f"{step / 1e12:.3f} | {step * steps / 1e15:.2f} | "
                  + " | ".join(f"{r:,.0f}" for r in rates) + " |", flush=True)
        totals[m] = total * a.folds
    print(f"\n{a.folds}-fold cross-validation, training only, at {a.mfu:.0%} of peak:\n")
    print("| method | EFLOP | " + " | ".join(f"{c} chip-hours" for c in chips) + " |")
    print("|---|---|" + "---|" * len(chips))
    for m, t in list(totals.items()) + [("all", sum(totals.values()))]:
        print(f"| {m} | {t / 1e18:.2f} | " + " | ".join(
            f"{t / (CHIPS[c] * a.mfu) / 3600:,.1f}" for c in chips) + " |")


if __name__ == "__main__":
    main()
