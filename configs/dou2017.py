"""Dou et al., "Automated pulmonary nodule detection via 3D ConvNets with online sample
filtering and hybrid-loss residual learning", MICCAI 2017 (arXiv 1708.03867).

Stage 1 (this config): the 3D screening FCN (``lungjax.models.fcn``) trained on
10x30x30 (z, y, x) patches of nodules and non-nodules with online sample filtering, then
applied fully-convolutionally to whole held-out scans (``--mode=evaluate``).

    python -m lungjax.main --config=configs/dou2017.py                 # generated data
    python -m lungjax.main --config=configs/dou2017.py:tiny --workdir=/tmp/dou_tiny
    python -m lungjax.main --config=configs/dou2017.py --config.data.root=/data/luna16
    python -m lungjax.main --config=configs/dou2017.py --mode=cv

Variants (``:arg``): ``tiny`` (a few seconds on CPU: small widths, generated "tiny" data),
default = the paper's settings at a step budget that fits a CPU run. ``arg`` may also carry
``key=value`` pairs after a comma, e.g. ``:tiny,fold=3``.

Decisions where the paper is silent (switchable by flags):
  * exact layer sizes (its figure is lost): see ``lungjax/models/fcn.py``;
  * batch composition: half positives (augmented as the paper lists), half negatives drawn
    from candidates and random lung positions (``data.positive_fraction``);
  * OSF on every training batch: hardest 50% + a random half of the rest
    (``train.osf.*``);
  * optimizer: Adam at the paper's learning rate 1e-3 (the paper does not name it);
  * screening threshold: the paper's 0.85 was grid-searched on its validation data;
    ``detection.threshold`` keeps it switchable.
"""

import importlib.util
import os


def _base():
    spec = importlib.util.spec_from_file_location(
        "lungjax_configs_base", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "base.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_arg(arg: str | None) -> tuple[str, dict]:
    """"tiny,fold=3" -> ("tiny", {"fold": "3"})."""
    parts = [p for p in (arg or "").split(",") if p]
    variant = ""
    kv = {}
    for p in parts:
        if "=" in p:
            k, v = p.split("=", 1)
            kv[k.strip()] = v.strip()
        elif not variant:
            variant = p.strip()
        else:
            raise ValueError(f"config arg {arg!r}: more than one variant name")
    if variant not in ("", "default", "tiny"):
        raise ValueError(f"configs/dou2017.py: unknown variant {variant!r} (tiny | default)")
    return variant or "default", kv


def get_config(arg: str | None = None):
    variant, kv = parse_arg(arg)
    c = _base().get_config()
    c.name = "dou2017" if variant == "default" else f"dou2017_{variant}"

    c.data.patch_size_zyx = (10, 30, 30)
    c.data.spacing_zyx = (1.0, 1.0, 1.0)
    c.data.positive_fraction = 0.5
    # Paper: positives augmented by translation within the nodule radius, flips, scaling
    # 0.9-1.1 and 90/180/270 degree rotations in the transverse plane.
    c.augment.positive.flip_axes = (0, 1, 2)
    c.augment.positive.rot90 = True
    c.augment.positive.scale_range = (0.9, 1.1)
    c.augment.positive.translate_nodule_fraction = 1.0
    c.augment.negative.flip_axes = (0, 1, 2)
    c.augment.negative.rot90 = True

    c.model.name = "dou2017_fcn"
    c.model.features = (64, 64, 150, 150)
    c.model.kernels = ((3, 5, 5), (3, 5, 5), (3, 5, 5), (4, 5, 5))
    c.model.num_classes = 2
    c.model.init_std = 0.01  # paper: N(0, 0.01)
    c.model.conv_impl = "auto"
    c.task.name = "classification"
    c.task.num_classes = 2
    c.task.loss = "softmax_cross_entropy"
    c.task.positive_class = 1

    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3  # paper
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 20

    c.train.batch_size = 64
    # CPU budget: the README's main command (generate + prepare + train + screen + FROC)
    # must finish within 30 minutes on 2 cores.
    c.train.num_steps = 300
    c.train.log_every = 25
    c.train.checkpoint_every = 100
    c.train.osf.enabled = True
    c.train.osf.hard_fraction = 0.5
    c.train.osf.easy_keep = 0.5

    c.sampler.steps_per_round = 100

    c.evals.patches = dict(type="patch_classification", every_steps=100)
    c.detection.threshold = 0.85  # paper (grid-searched on validation)
    c.detection.nms_distance_mm = 6.0
    c.detection.max_candidates_per_scan = 100
    c.detection.tile_zyx = (64, 128, 128)
    c.cv.folds = ()

    if variant == "tiny":
        c.data.synthetic_preset = "tiny"
        c.data.eval_patches = 64
        c.model.features = (4, 4, 8, 8)
        c.optimizer.warmup_steps = 0
        c.train.batch_size = 16
        c.train.num_steps = 12
        c.train.log_every = 4
        c.train.checkpoint_every = 4
        c.train.progress_bar = False
        c.sampler.steps_per_round = 6
        c.evals.patches.every_steps = 12
        c.detection.threshold = 0.5
        c.detection.tile_zyx = ()  # tiny scans: one pass, one compilation per scan shape
        c.detection.max_scans = 2
        c.cv.folds = (0, 1)

    for k, v in kv.items():
        if k == "fold":
            c.data.fold = int(v)
        elif k == "steps":
            c.train.num_steps = int(v)
        else:
            raise ValueError(f"configs/dou2017.py: unknown config arg {k!r} (fold | steps)")
    return c
