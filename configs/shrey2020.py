"""Shrey et al., "Lung nodule detection and classification using a cascaded U-Net and a
convolutional classifier" (2020): 2D U-Net nodule screening of axial slices, a
suspicious-slice rule, and a benign / malignant classifier on {image, predicted mask}.

The method, as the stages ``unet`` -> ``screen`` -> ``classify`` -> ``find`` run by
``lungjax.stages`` (models: ``lungjax.models.shrey2020``; the screening stage kind and
the paper's tables: ``lungjax.methods.shrey2020``):

1. ``unet``: the 2D U-Net (5 encoder stages of 3x3 convolutions, 64 channels doubling, a
   2x2 max-pool between stages, 50% dropout on the last two; 4 up-convolutions with skip
   concatenation; softmax over background / nodule, binary cross-entropy) trained on
   whole axial slices from 5 before to 5 after each nodule (``sampler.slice_context``),
   batch 16, Adam 1e-4, against nodule masks drawn as the paper draws them: a disc of the
   annotated diameter on every slice the nodule spans (``data.nodule_mask="disc"``; the
   dataset's consensus masks with ``--config.data.nodule_mask=consensus``);
2. ``screen``: the U-Net on every axial slice of the held-out scans; a slice is suspicious
   when its largest nodule probability is > 0.35 (``screening.threshold``): slice-level
   sensitivity / specificity, the threshold sweep (``screen/threshold_sweep.png``), volume
   Dice (``screen/screening.json``);
3. ``classify``: the classifier (3 convolutions 3x3, 8 channels doubling, each with a
   2x2 max-pool, 50% dropout on the last, FC 128, FC 2) on 64x64 crops centred on each
   annotated nodule, two channels {image, the frozen U-Net's predicted mask}; benign =
   median malignancy 1-2, malignant = 4-5, 3 excluded; benign ROIs oversampled 3x
   (``sampler.roi_class_repeat``); Adam 1e-4. Held-out precision, recall, F1, accuracy
   and ROC AUC with bootstrap intervals (``evals.cls``);
4. ``find``: the whole method on the held-out scans, as ``python -m lungjax.detect``
   runs its export (``--mode=export``) on a new scan: the suspicious slices, nodules as
   3D connected components of the U-Net's mask (> 0.5), each with its world position,
   diameter and malignant probability (the classifier on a crop at its centroid):
   ``find/submission.csv``; nodules found, FPs/scan, CPM and malignancy AUC in
   ``find/find.json``.

    python -m lungjax.main --config=configs/shrey2020.py                 # generated data
    python -m lungjax.main --config=configs/shrey2020.py:tiny --workdir=/tmp/shrey_tiny
    python -m lungjax.main --config=configs/shrey2020.py:paper --config.data.root=/data/luna16
    python -m lungjax.main --config=configs/shrey2020.py --mode=cv       # the paper's tables

Variants (``:arg``):
  * default: the CPU schedule for the generated default dataset (50 scans), sized so the
    whole job (generate and prepare the disc-mask store, train the U-Net, screen the 5
    held-out scans slice by slice, train the classifier, run the method on the held-out
    scans) finishes within 30 minutes on a 2-core CPU: measured 10 min 48 s from an
    empty cache, 2.2 GB peak (README). It differs from the paper in size and in what the
    U-Net sees: widths 16-256 instead of 64-1024; 64 x 64 crops of the training slices
    (a nodule slice's crop centred on its nodule, a nodule-free slice's on a lung voxel,
    each shifted up to 16 mm) instead of whole slices: on whole 128 x 208 slices a step
    took 6.5 s and the nodule was 0.3% of the pixels, and the U-Net stayed at Dice 0;
    1500 U-Net steps (0.23 s each) and 300 classifier steps of 16, learning rate 1e-3
    (1e-4 barely moves a network in so few steps), 128 held-out crops for the U-Net's
    Dice every 250 steps (its learning curve).
  * ``paper``: the paper's widths, learning rate 1e-4 and a GPU-sized schedule (U-Net
    20k steps, classifier 5k steps of 16), for real data.
  * ``tiny``: seconds on CPU (generated "tiny" data, minute widths), used by the tests.

``arg`` may also carry ``key=value`` pairs after a comma, e.g. ``:tiny,fold=3``
(``fold``, ``steps`` = U-Net steps, ``steps2`` = classifier steps, ``score`` = how the
``find`` stage alone scores its marks: peak | mean | volume).

``--mode=cv`` runs ``cv.folds`` with the paper's comparison classifiers as
``cv.variants`` (``fc_net``, ``encoder_decoder_fc``, ``resnet50``, ``vgg16``,
``densenet121``: only the classify stage differs, so each shares the fold's U-Net and
screening stages) and writes ``cv/shrey2020_tables.{md,json,png}``: the paper's Table 1
and 2 beside ours. The single-baseline configs are under ``configs/baselines/``.

Splits: the runner holds out one LUNA16 subset (``data.fold``, 10% of the scans) and
trains on the other nine. The paper's 80/5/15 (U-Net) and 60/15/25 (classifier) splits
by patient cannot be expressed with one held-out subset; they map to: test = the
held-out subset (both stages, so the classifier is never tested on a scan the U-Net
trained on), train = the other nine subsets; neither stage selects a model on a
validation part (fixed schedules), so the paper's 5% / 15% validation scans train.
LUNA16 subsets split by scan; LIDC-IDRI has one scan per patient for all but a handful
of patients, so by scan is by patient up to those.

Decisions where the paper is silent (switchable by flags):
  * two 3x3 convolutions per U-Net stage and the fifth stage as the bottleneck (four
    pools, four up-convolutions; ``lungjax/models/shrey2020.py``);
  * U-Net batches: half slices with nodule voxels, half without, from the slice window
    (``data.positive_fraction``); in ``paper`` whole slices zero-padded to a multiple of
    16 (``data.patch_size_zyx`` = (H, W) >= the stored slices), no augmentation; the
    default trains on 64 x 64 crops of those slices instead (see the variants);
  * the classifier's crop: 64x64 at 1 mm centred on the annotated nodule; the predicted
    mask is the U-Net's nodule probability > 0.5 on that crop
    (``stages.classify.sections.model.mask_threshold``);
  * the baseline classifiers see the same two-channel crop, trained from scratch with
    the same optimiser and schedule (only the network differs);
  * the classifier's ROIs flipped in-plane and turned by multiples of 90 degrees at
    random (``stages.classify.sections.augment``), both classes;
  * classifier batch 16; one ROI per nodule at its annotated centre (the paper's
    suspicious slices of held-out scans are scored by ``screen``, the classifier by the
    annotated nodules of the held-out scans);
  * on a new scan (``find``): a nodule is a 26-connected component of at least 3 voxels,
    the 100 of highest peak probability kept; its diameter is that of a disc of its
    largest axial area; the classifier's crop is centred on its centroid.
"""


from ml_collections import config_dict

from lungjax import config_schema as base

VARIANTS = ("default", "tiny", "paper")

# cv.variants name -> (MODELS name, constructor arguments at the paper's width, at the
# tiny width). Widths on the default (CPU) schedule are the paper's.
BASELINES = {
    "fc_net": ("fc_net_2d", dict(hidden=(512, 128)), dict(hidden=(16, 8))),
    "encoder_decoder_fc": ("encoder_decoder_fc_2d", dict(features=(32, 64), fc_features=128),
                           dict(features=(4, 8), fc_features=8)),
    "resnet50": ("resnet50_2d", dict(width=64), dict(width=4, blocks=(1, 1, 1, 1))),
    "vgg16": ("vgg16_2d", dict(features=(64, 128, 256, 512, 512), fc_features=4096),
              dict(features=(4, 4, 8, 8, 8), fc_features=8)),
    "densenet121": ("densenet121_2d", dict(growth=32), dict(growth=4, blocks=(1, 1, 1, 1))),
}



def _classify_sections(unet_features, crop):
    """Sections of the ``classify`` stage merged over the run config; ``model``,
    ``task`` and ``evals`` replace the U-Net's outright, the others merge."""
    s = config_dict.ConfigDict()
    s.model = config_dict.ConfigDict(dict(
        name="shrey2020_cascade", unet_features=tuple(unet_features),
        classifier="shrey2020_classifier", classifier_args={}, mask_threshold=0.5,
        conv_impl="auto"))
    s.task = config_dict.ConfigDict(dict(name="classification", num_classes=2,
                                         loss="softmax_cross_entropy", positive_class=1))
    s.data = config_dict.ConfigDict(dict(patch_size_zyx=(crop, crop), batch_mask=False,
                                         eval_patches=0, batch_malignancy=False))
    # Every ROI each round, benign ones 3x (the paper's oversampling), malignant once.
    s.sampler = config_dict.ConfigDict(dict(name="nodule_roi", roi_balance=False,
                                            roi_class_repeat=(3, 1)))
    # The ROI sits on its nodule: none of the U-Net's crop shifts; in-plane flips and
    # 90-degree turns instead (held-out loss 2.85 -> 0.80 on seed 0, 1.36 -> 0.70 on seed 1:
    # the classifier overfits ~120 ROIs without them).
    s.augment = config_dict.ConfigDict({
        side: dict(translate_mm=0.0, flip_axes=(1, 2), rot90=True)
        for side in ("positive", "negative")})
    s.optimizer = config_dict.ConfigDict(dict(name="adam", learning_rate=1e-4,
                                              schedule="constant"))
    s.train = config_dict.ConfigDict(dict(batch_size=16, num_steps=300, log_every=50,
                                          checkpoint_every=100))
    # size: the annotated diameter alone, its threshold fitted on the same training ROIs
    # (no network): what the held-out figures are read against.
    s.evals = config_dict.ConfigDict(dict(
        cls=dict(type="classification", every_steps=0, n_bootstrap=1000, seed=0),
        size=dict(type="size_rule", every_steps=0, n_bootstrap=1000, seed=0)))
    return s


def _stages(c, unet_features, crop, tiny: bool):
    c.stages.unet = dict(kind="train")
    c.stages.screen = dict(kind="shrey2020_slice_screen", network="unet", batch=16)
    c.stages.classify = dict(kind="train", init_from="unet", init_paths=("unet:unet",),
                             sections=_classify_sections(unet_features, crop),
                             replace=("model", "task", "evals"))
    # The whole method on the held-out scans (what --mode=export writes and
    # python -m lungjax.detect runs): U-Net slices -> nodules -> malignancy.
    c.stages.find = dict(kind="shrey2020_find", network="classify", segmenter_from="unet",
                         batch=16, progress=not tiny)
    c.stage_order = ("unet", "screen", "classify", "find")
    # The paper compares classifiers on the annotated nodules: a variant stops there.
    c.cv.variants = {
        name: dict(until="classify", stages=dict(classify=dict(sections=dict(model=dict(
            classifier=model, classifier_args=small if tiny else args)))))
        for name, (model, args, small) in BASELINES.items()}
    c.cv.report = "shrey2020_tables"


def get_config(arg: str | None = None):
    variant, kv = base.parse_variant(arg, VARIANTS, "configs/shrey2020.py")
    c = base.get_config()
    c.name = "shrey2020" if variant == "default" else f"shrey2020_{variant}"

    # Paper: nodule masks are discs of the annotated diameter on the slices it spans.
    c.data.nodule_mask = "disc"
    c.data.spatial_dims = 2
    # CPU schedule: 64 x 64 crops of the training slices, a positive one on its nodule
    # and a negative one on a lung voxel, each shifted up to 16 mm; a step costs a sixth
    # of a whole 128 x 208 slice's, and the nodule is not 0.3% of the pixels but ~2%.
    # The network is fully convolutional: screening still segments whole slices.
    c.data.patch_size_zyx = (64, 64)
    c.sampler.slice_centre = "nodule"
    for side in (c.augment.positive, c.augment.negative):
        side.translate_mm = 16.0
    c.data.batch_mask = True
    c.data.positive_fraction = 0.5
    c.data.eval_patches = 128  # held-out slices for the U-Net's Dice (~0.2 s each)
    c.data.malignancy_uncertain = "exclude"  # paper: malignancy 3 left out
    c.sampler.name = "balanced_slices"
    c.sampler.slice_context = 5  # paper: 5 slices before to 5 after each nodule
    c.sampler.steps_per_round = 0

    unet = (16, 32, 64, 128, 256)  # CPU schedule; the paper: 64 ... 1024
    c.model.name = "shrey2020_unet"
    c.model.features = unet
    c.model.dropout = 0.5
    c.model.conv_impl = "auto"
    c.task = config_dict.ConfigDict(dict(name="segmentation", num_classes=2, loss="bce",
                                         switch_step=0, dice_smooth=1.0, threshold=0.5))

    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3  # CPU schedule; the paper's 1e-4 in :paper
    c.optimizer.schedule = "constant"

    c.train.batch_size = 16  # paper
    c.train.num_steps = 1500
    c.train.log_every = 25
    c.train.checkpoint_every = 50

    # Held-out Dice every 250 steps: the learning curve (unet/learning_curve.png).
    c.evals.seg = dict(type="segmentation", every_steps=250, threshold=0.5, spacing=())
    # The suspicious-slice rule (the paper's "discriminator").
    c.screening.threshold = 0.35
    # A found nodule's mark: its component's peak probability. Mean probability / expected
    # volume ranked better on seed 0 (CPM 0.212 -> 0.261 / 0.257) and worse on seed 1
    # (0.206 -> 0.185 / 0.197), same networks.
    c.screening.nodule_score = "peak"
    c.detection.conv_impl = "xla"  # whole slices of whole scans: no im2col buffers
    c.cv.folds = ()

    crop = 64
    if variant == "paper":
        unet = (64, 128, 256, 512, 1024)
        c.model.features = unet
        c.optimizer.learning_rate = 1e-4
        c.train.num_steps = 20_000
        c.evals.seg.every_steps = 1000
        c.train.log_every = 100
        c.train.checkpoint_every = 1000
        # Whole slices, as the paper: real scans at 1 mm are up to ~350 x 350 in-plane
        # after the lung crop.
        c.data.patch_size_zyx = (384, 384)
        c.sampler.slice_centre = "middle"
        for side in (c.augment.positive, c.augment.negative):
            side.translate_mm = 0.0
    elif variant == "tiny":
        unet = (4, 8, 8, 16, 16)
        c.model.features = unet
        c.data.synthetic_preset = "tiny"
        c.data.patch_size_zyx = (96, 112)
        c.sampler.slice_centre = "middle"
        for side in (c.augment.positive, c.augment.negative):
            side.translate_mm = 0.0
        c.data.eval_patches = 16
        c.evals.seg.every_steps = 0
        c.train.batch_size = 8
        c.train.num_steps = 6
        c.train.log_every = 3
        c.train.checkpoint_every = 3
        c.train.progress_bar = False
        c.train.async_checkpoint = False
        c.cv.folds = (0, 1)
        crop = 32
    _stages(c, unet, crop, tiny=variant == "tiny")
    if variant == "tiny":
        c.stages.screen.progress = False

    s2 = c.stages.classify.sections
    if variant == "paper":
        s2.train.num_steps = 5000
        s2.train.log_every = 100
        s2.train.checkpoint_every = 1000
    elif variant == "tiny":
        s2.train.batch_size = 8
        s2.train.num_steps = 4
        s2.train.log_every = 2
        s2.train.checkpoint_every = 4
        s2.evals.cls.n_bootstrap = 50
        s2.evals.size.n_bootstrap = 50
    else:
        s2.optimizer.learning_rate = 1e-3  # CPU schedule, as the U-Net's

    for k, v in kv.items():
        if k == "fold":
            c.data.fold = int(v)
        elif k == "steps":
            c.train.num_steps = int(v)
        elif k == "steps2":
            s2.train.num_steps = int(v)
        elif k == "score":
            # The find stage alone scores its marks so: with --restart on a finished run,
            # only `find` runs again (a run-level screening.nodule_score is in every
            # stage's config, so the U-Net would train again).
            from lungjax.tasks.screening import NODULE_SCORES

            if v not in NODULE_SCORES:
                raise ValueError(f"configs/shrey2020.py: score={v!r}: one of "
                                 f"{' | '.join(NODULE_SCORES)}")
            c.stages.find.sections = {"screening": {"nodule_score": v}}
        else:
            raise ValueError(f"configs/shrey2020.py: unknown config arg {k!r} "
                             "(fold | steps | steps2 | score)")
    return c
