"""Measures, on this machine, the convolution plan of every layer shape a method trains.

    python -m lungjax.tune --config=configs/dou2017.py[:variant] [--seconds=30] \
        [--exhaustive] [--force] [--list] [--config.a.b=value ...]

Every network of every training stage of the config is traced (no data, no compilation of
the networks) at its stage's global batch and patch size; each convolution shape is
measured twice over, as a training layer (forward and both gradients) and as a
forward-only one (held-out batches, candidate classification at that batch), and the
winners go into this machine's plan cache (``lungjax.models.conv.select``:
``~/.cache/lungjax/conv/<fingerprint>.json``), which every later run on this machine reads.
Without this command the same happens on first use, bounded to
``LUNGJAX_CONV_TUNE_SECONDS`` per shape (4 s), which skips the shapes too large to measure
in that time; here each shape may take ``--seconds``. ``--exhaustive`` times every choice
of each pass of a training shape alone, as ``bench/conv_autotune.py`` does for the shipped
table (minutes per large shape). Shapes that only whole-scan inference meets (tiles sized
to each scan) are tuned on first use by ``python -m lungjax.detect``.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import app, flags

from lungjax import main as main_lib

FLAGS = flags.FLAGS
flags.DEFINE_float("seconds", 30.0, "Most seconds one layer shape may take (compilation and "
                   "timing); larger shapes are left to the shipped table.")
flags.DEFINE_bool("exhaustive", False, "Time every choice of every pass of the training "
                  "shapes alone (as bench/conv_autotune.py); slow.")
flags.DEFINE_bool("force", False, "Measure again the shapes this machine has plans for.")
flags.DEFINE_bool("list", False, "Only list the shapes and the plan each would run now.")


def method_keys(config) -> list:
    """The ``ConvKey`` of every convolution of every network of the config's training
    stages, training pass then forward-only, unique, in trace order."""
    import jax
    import jax.numpy as jnp

    from lungjax import stages, train
    from lungjax.models.conv import select as conv_select

    keys = []
    for name, spec in stages.stage_specs(config):
        if spec["kind"] != "train":
            continue
        cfg = stages.stage_config(config, name, spec)
        with cfg.unlocked():
            cfg.train.init_from = ""  # shapes only: no checkpoint to read
        for net in train.build_networks(cfg, train.stage_settings(cfg)):
            x = jax.ShapeDtypeStruct((int(cfg.train.batch_size),
                                      *net.sample_input.shape[1:]), jnp.float32)
            with conv_select.record_keys() as seen:
                jax.eval_shape(lambda x, m=net.model: m.init(
                    {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x,
                    train=False), x)
            keys += seen
    keys = list(dict.fromkeys(keys))
    return keys + [dataclasses.replace(k, mode="forward") for k in keys]


def describe_key(key) -> str:
    return (f"{key.mode} {key.kind} b{key.batch} {'x'.join(map(str, key.spatial))} "
            f"{key.cin}->{key.cout} k{'x'.join(map(str, key.kernel))}"
            + (f" s{'x'.join(map(str, key.strides))}" if max(key.strides) > 1 else ""))


def tune_keys(keys, seconds: float, *, exhaustive: bool = False, force: bool = False,
              progress: bool = True) -> list[dict]:
    """Measures ``keys`` not yet tuned on this machine (all with ``force``) and records each
    winner in the machine's cache as soon as it is known (an interrupted run keeps them).

    Returns:
      one row per key: {"key", "before" (plan and how, as ``lookup``), "after", "ms",
      "seconds"}.
    """
    from tqdm import tqdm

    from lungjax.models.conv import select as conv_select
    from lungjax.models.conv import tune as conv_tune

    rows = []
    bar = tqdm(keys, desc="tuning convolutions", unit="shape", disable=not progress)
    for key in bar:
        before = conv_select.lookup(key)
        row = {"key": describe_key(key), "before": before, "after": before[0], "ms": {},
               "seconds": 0.0}
        if before[1] == "tuned" and not force:
            rows.append(row)
            continue
        bar.set_postfix_str(describe_key(key))
        fallback = before[0] if before[1] != "tuned" else \
            conv_select.lookup(dataclasses.replace(key, mode="train"))[0]
        t0 = time.perf_counter()
        if exhaustive and key.mode == "train":
            entry = conv_tune.tune_key(key, max_buffer_bytes=conv_select.buffer_budget()
                                       or (2 << 30))
            ms, best, passes = entry["ms"], entry["best"], entry.get("passes")
        else:
            res = conv_tune.tune_bounded(key, conv_select.prior(key), fallback, seconds,
                                         conv_select.buffer_budget())
            ms, best, passes = res["ms"], res["best"], None
        if ms:
            conv_select.record(key, ms, best, passes)
        row.update(after=best, ms=ms, seconds=round(time.perf_counter() - t0, 2))
        rows.append(row)
    return rows


def _main():
    config = FLAGS.config
    main_lib._configure_malloc(config, "lungjax.tune")  # plans measured under the run's allocator
    from lungjax import train
    from lungjax.models.conv import machine as conv_machine
    from lungjax.models.conv import select as conv_select

    train.validate_config(config)
    os.environ[conv_select.ENV_TUNE] = "1"  # this command is the tuning asked for
    keys = method_keys(config)
    print(f"{config.name}: {len(keys)} convolution shapes (training and forward-only) on "
          f"{conv_machine.describe()}; cache {conv_machine.cache_file()}", flush=True)
    if FLAGS.list:
        for key in keys:
            impl, how = conv_select.lookup(key)
            print(f"  {describe_key(key)}: {impl} ({how})")
        return
    t0 = time.perf_counter()
    rows = tune_keys(keys, FLAGS.seconds, exhaustive=FLAGS.exhaustive, force=FLAGS.force)
    measured = [r for r in rows if r["ms"]]
    for r in measured:
        times = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["ms"].items(), key=lambda kv: kv[1]))
        print(f"  {r['key']}: {r['before'][0]} ({r['before'][1]}) -> {r['after']}  [{times} ms]")
    changed = sum(r["after"] != r["before"][0] for r in measured)
    skipped = sum(not r["ms"] and r["before"][1] != "tuned" for r in rows)
    print(f"{len(measured)} shapes measured in {time.perf_counter() - t0:.0f} s, {changed} "
          f"with another plan than before; {skipped} too large for --seconds="
          f"{FLAGS.seconds:g} (they keep the shipped plan); "
          f"{len(rows) - len(measured) - skipped} already tuned", flush=True)


def main(argv):
    main_lib.run_one_line(_main, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=main_lib._parse_flags)
