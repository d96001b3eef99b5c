"""Sathish et al., "Lung segmentation and nodule detection in computed tomography scan
using a convolutional neural network trained adversarially using Turing test loss",
EMBC 2020 (arXiv 2006.09308).

The method as the stages ``seg`` -> ``cls`` run by ``lungjax.stages``:

1. ``seg``: SUMNet (``lungjax.models.sathish2020``: VGG11-BN encoder, decoder unpooling
   with the encoder's max-pool indices) segments the lungs on 2D axial slices, trained
   against a Turing-test discriminator in alternation (``lungjax.methods.sathish2020``,
   step "turing_test": one discriminator step on the shuffled {ground truth, prediction}
   channel pair, then one segmenter step on J_seg - alpha * J_adv, alpha = 0.001), Adam
   1e-4 for both; held-out slices scored by the "segmentation" evaluator (Dice, pixel
   AUC, Hausdorff distance in mm);
2. ``cls``: the modified LeNet classifies 64x64 patches from inside the lung mask as
   nodule present / absent (balanced batches), Adam 1e-4; held-out patches scored by the
   "classification" evaluator (accuracy, sensitivity, specificity with bootstrap
   intervals);
3. ``find``: both on whole held-out scans (``lungjax.methods.sathish2020.find_stage``):
   each axial slice segmented, the predicted lungs grown by ``sathish2020.wall_mm`` (the
   lung wall), 64x64 patches on a ``sathish2020.patch_stride`` grid inside them
   classified; lung Dice / HD95 against the scan's lung mask, patch accuracy /
   sensitivity / specificity against the annotated nodules, the predicted masks
   (``find/masks/<uid>.mha``) and the nodule-bearing patches (``find/patches.csv``,
   world mm). ``--mode=export`` writes this stage; ``python -m lungjax.detect
   --model=<workdir>/export --scan=SCAN --out=DIR`` runs it on a new scan and writes the
   lung mask on the scan's own grid (``masks/<uid>_lung.mhd``) with the patches as CSV.

    python -m lungjax.main --config=configs/sathish2020.py              # generated data
    python -m lungjax.main --config=configs/sathish2020.py:tiny --workdir=/tmp/sathish_tiny
    python -m lungjax.main --config=configs/sathish2020.py:paper --config.data.root=/data/luna16
    python bench/sathish2020_counts.py        # parameter and FLOP counts vs the paper's
    python -m lungjax.main --config=configs/sathish2020.py:tiny --mode=cv --workdir=/tmp/s_cv
    python -m lungjax.explain --model=runs/sathish2020/export --scan=SCAN --out=DIR  # RISE

``--mode=cv`` runs ``cv.folds`` (all ten by default; ``tiny``: 0 and 1) with the three
baseline segmenters as ``cv.variants`` (``unet``, ``r2unet``, ``sumnet``: trained without
the adversary; the classifier stage is shared) and writes the paper's table beside ours
(``cv/sathish2020_tables.md``, ``.json``, ``.png``: the first fold and the mean +- sd of lung
DSC, pixel AUC and HD95, and the classifier's accuracy, sensitivity and specificity).

Baselines (segmentation only, same data and schedule): ``configs/baselines/
sathish2020_unet.py``, ``sathish2020_r2unet.py``, ``sathish2020_sumnet.py`` (SUMNet
without the adversary).

Variants (``:arg``):
  * default: the generated default dataset (50 scans) on a 2-core CPU within 30 minutes:
    slices 128 x 192 (the generated chests at 1 mm fit almost whole), SUMNet and the
    discriminator at a quarter of the paper's widths (``features=16``), 600 segmenter
    steps of 8 slices, 8000 LeNet steps of 32 patches;
  * ``paper``: 512 x 512 slices, the paper's widths, 35 epochs of the segmenter and 50 of
    the classifier (``num_steps`` from the estimated slice / patch counts of nine LUNA16
    subsets, see ``_paper``), for real LUNA16 data;
  * ``tiny``: seconds on CPU (generated "tiny" data, 64 x 64 slices, minute widths),
    used by the tests.
``arg`` may carry ``key=value`` pairs: ``fold``, ``steps`` (segmenter steps),
``steps2`` (classifier steps).

Decisions where the paper is silent (switchable by flags):
  * slices: the preprocessed store's axial slices (1 mm in-plane) holding lung, centred
    crops of ``data.patch_size_zyx`` (``sampler.slice_context = -1``); the balanced slice
    sampler's nodule / no-nodule share (``data.positive_fraction`` 0.25) decides how
    often nodule slices come up;
  * the lung target is the store's lung mask (``data.batch_mask_array = "lung"``);
  * segmentation loss: 2-class softmax cross entropy (``task.loss = "bce"``);
  * the discriminator sees the segmenter's foreground probability in training mode
    (batch statistics), and in the segmenter's step a freshly shuffled pair;
  * batch norm running averages with PyTorch's momentum 0.1;
  * batch sizes (8 slices, 32 patches); LeNet trained with 2-class softmax cross
    entropy (the paper's two sigmoid outputs carry the same decision);
  * classifier patches: nodule-centred positives moved within the nodule radius and
    flipped; negatives half at random lung points away from every finding, half on the
    scans' candidate list (LUNA16 ``candidates_V2.csv`` points that are not nodules:
    vessels, scars, the blobs a nodule detector stops at). The held-out patches are the
    nodules and such candidates; trained on random lung points alone, the LeNet took
    most candidates for nodules (generated seed 0: held-out specificity 0.29, accuracy
    0.39; with candidates among its negatives 0.76 and 0.78).
"""


from ml_collections import config_dict

from lungjax import config_schema as base

VARIANTS = ("default", "tiny", "paper")
SEGMENTERS = {"sumnet": "sathish2020_sumnet", "unet": "sathish2020_unet",
              "r2unet": "sathish2020_r2unet"}



def _classifier(size, batch, steps, n_bootstrap):
    """Sections of the classifier stage ``cls``, merged over the run config; ``model``,
    ``task``, ``evals`` and ``networks`` replace the segmentation stage's."""
    s = config_dict.ConfigDict()
    s.model = config_dict.ConfigDict(dict(name="sathish2020_lenet", num_classes=2,
                                          dropout_rate=0.5, conv_impl="auto"))
    s.task = config_dict.ConfigDict(dict(name="classification", num_classes=2,
                                         loss="softmax_cross_entropy", positive_class=1))
    s.networks = config_dict.ConfigDict()
    s.data = config_dict.ConfigDict(dict(patch_size_zyx=(size, size), batch_mask=False,
                                         positive_fraction=0.5))
    s.optimizer = config_dict.ConfigDict(dict(name="adam", learning_rate=1e-4))
    s.train = config_dict.ConfigDict(dict(network="classifier", step="supervised",
                                          batch_size=batch, num_steps=steps))
    s.sampler = config_dict.ConfigDict(dict(
        name="balanced", positive_sources=("nodules",),
        negative_mix=(("candidate", 1.0), ("random", 1.0)), random_negatives_per_scan=64))
    s.augment = config_dict.ConfigDict(dict(
        positive=dict(flip_axes=(1, 2), rot90=True, scale_range=(1.0, 1.0), translate_mm=0.0,
                      translate_nodule_fraction=1.0),
        negative=dict(flip_axes=(1, 2), rot90=True, scale_range=(1.0, 1.0), translate_mm=0.0,
                      translate_nodule_fraction=0.0)))
    s.evals = config_dict.ConfigDict(dict(cls=dict(type="classification", every_steps=0,
                                                   n_bootstrap=n_bootstrap, seed=0)))
    return s


def _sizes(variant):
    """(slice (H, W), width, discriminator pools, final kernel, seg batch, seg steps,
    cls batch, cls steps, held-out slices / patches, bootstrap resamples)."""
    if variant == "tiny":
        # 40 segmenter steps (at 1e-3, below) take ~3 s more than 4 and leave the lung
        # Dice on held-out slices at 0.93 instead of 0.005 (0.003 at step 0).
        return dict(slice=(64, 64), features=4, pools=(2, 2, 1, 1), final_kernel=3,
                    batch=8, steps=40, batch2=8, steps2=4, eval_patches=16, n_bootstrap=50)
    if variant == "paper":
        # 35 epochs of the lung slices of nine LUNA16 subsets (~800 scans x ~250 slices
        # at 1 mm = 200k) at batch 8, and 50 epochs of ~2.4k balanced patches (the ~1.2k
        # nodules of nine subsets, as many lung negatives) at batch 32.
        return dict(slice=(512, 512), features=64, pools=(3, 3, 3, 2), final_kernel=7,
                    batch=8, steps=35 * 200_000 // 8, batch2=32, steps2=50 * 2_400 // 32,
                    eval_patches=2048, n_bootstrap=1000)
    # Measured alone on the 2-core CPU: 0.44 s per adversarial step of 8 slices, 0.025 s
    # per LeNet step of 32 patches. With 1000 LeNet steps the whole job took 6 min 48 s
    # (data prepared) and the LeNet was still learning (training accuracy 0.73 -> 0.85
    # over steps 450-1000; held-out patch specificity 0.28), so it trains 8000 (~3.5 min).
    return dict(slice=(128, 192), features=16, pools=(2, 2, 2, 1), final_kernel=5,
                batch=8, steps=600, batch2=32, steps2=8000, eval_patches=256,
                n_bootstrap=1000)


def get_config(arg=None, segmenter: str = "sumnet", adversary: bool = True):
    """The method (SUMNet + adversary, then LeNet) or, with ``adversary=False``, the
    segmentation-only baseline of ``segmenter`` (configs/baselines/sathish2020_*.py)."""
    if adversary and segmenter != "sumnet":
        raise ValueError("the Turing-test adversary trains SUMNet (the paper's method)")
    variant, kv = base.parse_variant(arg, VARIANTS, "configs/sathish2020.py")
    unknown = sorted(set(kv) - {"fold", "steps", "steps2"})
    if unknown:
        raise ValueError(f"configs/sathish2020.py: unknown config arg {unknown[0]!r} "
                         "(fold, steps, steps2)")
    z = _sizes(variant)
    c = base.get_config()
    c.name = "sathish2020" if adversary else f"sathish2020_{segmenter}"

    c.data.synthetic_preset = "tiny" if variant == "tiny" else "default"
    c.data.spatial_dims = 2
    c.data.patch_size_zyx = tuple(z["slice"])
    c.data.batch_mask = True
    c.data.batch_mask_array = "lung"
    c.data.positive_fraction = 0.25
    c.data.eval_patches = z["eval_patches"]
    c.sampler.name = "balanced_slices"
    c.sampler.slice_context = -1  # every slice holding lung

    c.model = config_dict.ConfigDict(dict(name=SEGMENTERS[segmenter], num_classes=2,
                                          features=z["features"], conv_impl="auto"))
    c.task = config_dict.ConfigDict(dict(name="segmentation", num_classes=2, loss="bce",
                                         switch_step=0, dice_smooth=1.0, threshold=0.5))
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3 if variant == "tiny" else 1e-4  # paper: 1e-4
    c.train.batch_size = z["batch"]
    c.train.num_steps = int(kv.get("steps", z["steps"]))
    c.train.log_every = max(1, min(50, c.train.num_steps // 4))
    c.train.checkpoint_every = max(1, min(500, c.train.num_steps // 2))
    c.train.progress_bar = variant != "tiny"
    c.train.network = "segmenter"
    # --- method section: the adversarial weight of J_net = J_seg - alpha * J_adv ---------
    c.sathish2020.alpha = 0.001
    if adversary:
        c.train.step = "turing_test"
        c.networks.discriminator = dict(
            model=dict(name="sathish2020_turing", features=z["features"],
                       pools=tuple(z["pools"]), final_kernel=z["final_kernel"],
                       conv_impl="auto"),
            optimizer=dict(name="adam", learning_rate=1e-4), input_channels=2)
    c.evals = config_dict.ConfigDict(dict(seg=dict(type="segmentation", every_steps=0,
                                                   threshold=0.5, spacing=())))
    if "fold" in kv:
        c.data.fold = int(kv["fold"])

    c.stages.seg = dict(kind="train")
    order = ["seg"]
    if adversary:
        c.stages.cls = dict(
            kind="train", replace=("model", "task", "evals", "networks"),
            sections=_classifier(64, z["batch2"], int(kv.get("steps2", z["steps2"])),
                                 z["n_bootstrap"]))
        order.append("cls")
        # The method on whole held-out scans: lungs by "seg", nodule patches by "cls";
        # what --mode=export writes and python -m lungjax.detect runs.
        c.stages.find = dict(kind="sathish2020_find", network="cls", segmenter_from="seg",
                             progress=variant != "tiny")
        order.append("find")
        # --mode=cv: the paper's comparison, each baseline segmenter as a variant (trained
        # without the adversary; the classifier stage is shared, "find" reruns on it).
        c.cv.variants = {
            name: dict(stages=dict(seg=dict(
                sections=dict(model=dict(name=SEGMENTERS[name]),
                              train=dict(step="supervised"), networks={}),
                replace=("networks",))))
            for name in ("unet", "r2unet", "sumnet")}
        c.cv.report = "sathish2020_tables"
        if variant == "tiny":
            c.cv.folds = (0, 1)
    c.stage_order = tuple(order)
    c.export.input_size_zyx = tuple(z["slice"])
    return c
