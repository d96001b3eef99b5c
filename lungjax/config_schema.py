"""Every configuration field lungjax knows, with defaults (the config contract).

Method files (``configs/<firstauthor><year>.py``) start from ``get_config()`` here and set
what they need; a field that is neither here nor an argument of the model / task /
evaluator a section names fails by name (``lungjax.configcheck.check_declared``). Fields a method must choose are *required placeholders*: reading one left
unset raises ``RequiredValueError`` (``lungjax.train.validate_config`` lists them all up
front). Field
types are fixed here, so ``--config.train.batch_size=abc`` is rejected by the command line.
"""

from __future__ import annotations

from ml_collections import config_dict

REQUIRED = config_dict.required_placeholder
OPTIONAL = config_dict.placeholder


def get_config():
    c = config_dict.ConfigDict()
    c.name = REQUIRED(str)  # method name, e.g. "dou2017"; default workdir runs/<name>
    c.seed = 0
    # PRNG implementation: "rbg" compiles in a fraction of threefry's time on XLA:CPU.
    c.rng_impl = "rbg"

    # --- process settings (lungjax.main, before the first computation) ---------------
    c.runtime = config_dict.ConfigDict()
    # On CPU, glibc keeps freed memory in the heap (lungjax.models.conv.malloc): XLA's
    # per-call buffers stop page-faulting (~70% fewer faults, FCN step 4.3 -> 3.3 s), but
    # heap fragmentation raises peak resident memory (2.4 -> 5.9 GB for that FCN; a 64^3 x 8
    # xie2018 run went past 21 GB and was killed), so it is opt-in.
    c.runtime.keep_freed_memory = False
    # On CPU under Linux glibc, ``python -m lungjax.main`` restarts itself once with
    # GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (lungjax.models.conv.malloc.reexec_with_huge_pages):
    # XLA's large per-call buffers are faulted 2 MiB at a time, 11-12% off a train step at
    # the same peak memory. False leaves the allocator as the process started.
    c.runtime.huge_pages = True

    # --- data -----------------------------------------------------------------------
    c.data = config_dict.ConfigDict()
    c.data.source = "store"  # "store": LUNA16-layout data through the patch store
    c.data.root = OPTIONAL(str)  # LUNA16-layout directory; unset = generated dataset
    c.data.store = OPTIONAL(str)  # prepared patch store; unset = <cache_dir>/<name>/store
    c.data.cache_dir = "data_cache"
    c.data.synthetic_preset = "default"  # generated dataset when data.root is unset
    c.data.synthetic_seed = 0
    c.data.spacing_zyx = (1.0, 1.0, 1.0)
    c.data.hu_window = (-1200.0, 600.0)
    c.data.prepare_workers = 1
    c.data.patch_size_zyx = REQUIRED(tuple)
    c.data.spatial_dims = 3
    c.data.num_folds = 10  # LUNA16 subsets
    c.data.fold = 0  # held-out fold in --mode=train/evaluate
    c.data.val_fraction_of_train = 0.0  # extra validation split carved from training folds
    c.data.positive_fraction = 0.5  # share of positives in a training batch
    c.data.negatives_per_round = 0  # 0 = pool size decided by the pipeline
    c.data.workers = 0  # Grain multiprocess prefetch workers (0 = in-process)
    c.data.prefetch_buffer = 2
    c.data.eval_patches = 512  # held-out patches for the patch-level eval hook
    c.data.read_threads = 2  # threads per process reading patches (Grain ReadOptions)
    c.data.prefetch_batches = 4  # batches those threads read ahead
    # > 0: batches carry "nodules_zyx" (B, M, 3) / "nodules_diameter_mm" (B, M): every
    # nodule within the patch (anchor targets), padded to M.
    c.data.max_nodules_per_patch = 0
    # Store nodule masks: "consensus" (the dataset's masks where present, else spheres of
    # the annotated diameter) | "sphere" (always balls of the annotated diameter) | "disc"
    # (an axial disc of the annotated diameter on every slice the nodule spans, as Shrey
    # et al. draw them). Each rule has its own default store (train_data.default_store_path).
    c.data.nodule_mask = "consensus"
    c.data.batch_mask = False  # batches carry "mask": the nodule mask, transformed as the image
    c.data.batch_mask_array = "nodules"  # the stored mask "mask" is: "nodules" | "lung"
    # Batches carry "malignancy" (median reader score) and "malignant" (1 / 0 / -1 excluded).
    c.data.batch_malignancy = False
    c.data.malignancy_uncertain = "exclude"  # median 3, ties 2.5 / 3.5: exclude|benign|malignant

    # --- augmentation (lungjax.data.augment.AugmentConfig fields) ---------------------
    c.augment = config_dict.ConfigDict()
    c.augment.positive = config_dict.ConfigDict(dict(
        flip_axes=(), rot90=False, scale_range=(1.0, 1.0), translate_mm=0.0,
        translate_nodule_fraction=0.0))
    c.augment.negative = config_dict.ConfigDict(dict(
        flip_axes=(), rot90=False, scale_range=(1.0, 1.0), translate_mm=0.0,
        translate_nodule_fraction=0.0))

    # --- host-side sampler ----------------------------------------------------------
    c.sampler = config_dict.ConfigDict()
    c.sampler.name = "balanced"
    c.sampler.steps_per_round = 0  # 0 = one round for the whole run
    c.sampler.hard_negative_fraction = 0.0  # of negatives drawn from high-loss ones
    c.sampler.slice_context = 5  # balanced_slices: slices kept before/after each nodule; -1 = all
    # balanced_slices: "middle" = whole slices (crop centred in-plane) | "nodule" = crops
    # centred on the slice's nodule (positives) or a lung voxel (negatives).
    c.sampler.slice_centre = "middle"
    c.sampler.roi_balance = True  # nodule_roi: exact malignant share (data.positive_fraction)
    # nodule_roi without roi_balance: times each (benign, malignant) ROI enters a round's
    # pass (oversampling; Shrey et al. repeat benign ROIs 3x: (3, 1)).
    c.sampler.roi_class_repeat = (1, 1)
    # nodule_roi: leave out training ROIs whose patient (a generated dataset: the LIDC
    # patient the nodule was taken from) also gave a held-out nodule.
    c.sampler.roi_split_by_patient = True
    # The pool and its rounds (lungjax.data.sampler.SamplerConfig; data.positive_fraction
    # and sampler.hard_negative_fraction fill its positive_fraction / hard_fraction).
    c.sampler.samples_per_round = 0  # 0 = enough for every positive once
    c.sampler.positive_sources = ("nodules",)  # "nodules" and/or "candidates"
    c.sampler.negative_mix = (("candidate", 1.0), ("random", 1.0), ("hard", 1.0))
    c.sampler.random_negatives_per_scan = 64
    c.sampler.negative_margin_mm = 5.0
    c.sampler.fp_merge_distance_mm = 5.0
    c.sampler.score_momentum = 0.0
    c.sampler.positive_weight = 1.0
    c.sampler.negative_weight = 1.0
    c.sampler.score_key = "loss"  # host output fed back to the sampler as the sample score
    # "xie2018_anchors" (lungjax.methods.xie2018.AnchorSamplingData): provisional tests
    # between rounds add false positives as sampling anchors.
    c.sampler.update_anchors = True  # False: fixed anchors (ground truth only)
    c.sampler.provisional_threshold = 0.5  # noduleness above which a detection counts
    c.sampler.max_fp_per_scan = 20  # detections per scan kept, highest first
    c.sampler.provisional_scans = 0  # training scans tested (evenly spread); 0 = all
    c.sampler.min_positive_fraction = 0.0  # floor of the positives' share once FPs exist

    # --- model / task ---------------------------------------------------------------
    c.model = config_dict.ConfigDict()
    c.model.name = REQUIRED(str)  # a lungjax.registry.MODELS key
    c.task = config_dict.ConfigDict()
    c.task.name = "classification"  # a lungjax.registry.TASKS key

    # --- optimisation ---------------------------------------------------------------
    c.optimizer = config_dict.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = REQUIRED(float)
    c.optimizer.schedule = "constant"  # "constant" | "cosine" | "step" | "plateau"
    c.optimizer.warmup_steps = 0
    c.optimizer.decay_steps = ()
    c.optimizer.decay_factor = 0.1
    # schedule="plateau" (optax.contrib.reduce_on_plateau): the training loss is averaged
    # over plateau_accumulation_steps steps (one step's loss is too noisy); after
    # plateau_patience such averages without improvement (below (1 - rtol) * best - atol)
    # the learning rate is multiplied by decay_factor, then plateau_cooldown averages pass
    # before counting again; it never falls below plateau_min_scale x learning_rate.
    c.optimizer.plateau_patience = 10
    c.optimizer.plateau_cooldown = 0
    c.optimizer.plateau_rtol = 1e-4
    c.optimizer.plateau_atol = 0.0
    c.optimizer.plateau_accumulation_steps = 100
    c.optimizer.plateau_min_scale = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.grad_clip_norm = 0.0

    c.train = config_dict.ConfigDict()
    c.train.batch_size = REQUIRED(int)  # global batch (all hosts, all devices)
    c.train.num_steps = REQUIRED(int)
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True
    c.train.compute_dtype = "float32"  # or "bfloat16" (params stay float32)
    c.train.progress_bar = True
    c.train.osf = config_dict.ConfigDict(dict(enabled=False, hard_fraction=0.5, easy_keep=0.5))
    # Initialise this run's params from another run's checkpoint (two-stage methods):
    # pairs "src/path:dst/path" of module paths.
    c.train.init_from = OPTIONAL(str)
    c.train.init_paths = ()
    c.train.init_network = ""  # network of train.init_from's run to take params from ("" = its only one)
    # Name of the network built from c.model / c.optimizer (the task's: evaluated, exported).
    c.train.network = "net"
    c.train.step = "supervised"  # a lungjax.registry.STEPS key: how a step updates the networks
    # Further networks of the stage, trained in the same step (e.g. an adversary): name ->
    # dict(model=dict(name=<MODELS key>, ...), optimizer=dict(<overrides of c.optimizer>),
    # input_channels=int). Empty = one network.
    c.networks = config_dict.ConfigDict()

    # --- evaluation hooks: name -> dict(type=<EVALUATORS key>, every_steps=N, ...) ---------
    c.evals = config_dict.ConfigDict()

    # --- detection (full-scan screening in --mode=evaluate) --------------------------
    c.detection = config_dict.ConfigDict()
    c.detection.threshold = 0.5
    c.detection.nms_distance_mm = 6.0
    c.detection.max_candidates_per_scan = 100
    c.detection.tile_zyx = (64, 128, 128)
    c.detection.max_scans = 0  # 0 = every held-out scan
    # Keep only candidates inside the store's lung mask (closed and hole-filled, so
    # juxtapleural nodules stay in). Networks trained on lung patches have never seen the
    # chest wall, heart or bone as negatives and fire there on whole scans.
    c.detection.lung_only = False
    # > 0: a candidate sits at the centroid of the score above the threshold within this
    # radius of its peak (sub-cell position; lungjax.tasks.screening.refine_peaks).
    c.detection.refine_radius_mm = 0.0
    # Convolution formulation for whole-scan scoring and export: the CPU-fast im2col
    # formulations materialise patch matrices that do not fit in memory at scan size.
    c.detection.conv_impl = "xla"
    # Whole-scan detector of a "detect" stage (lungjax.registry.DETECTORS): "score_volume"
    # thresholds a fully convolutional network's score volume.
    c.detection.detector = "score_volume"
    # Anchor detectors (xie2018): suppression across heads, "iou" | "soft" (soft-NMS) |
    # "distance" (nms_distance_mm), and the context around each tile (voxels).
    c.detection.nms = "iou"
    c.detection.nms_iou = 0.1
    c.detection.soft_nms_sigma = 0.5
    c.detection.halo = 32

    # --- the method: its stages, in order (lungjax.stages) ---------------------------
    # name -> dict of lungjax.stages.STAGE_FIELDS (kind, sections, network, init_from, ...)
    c.stages = config_dict.ConfigDict()
    c.stage_order = ()  # the stages' names in the order they run

    # --- cross-validation -----------------------------------------------------------
    c.cv = config_dict.ConfigDict()
    c.cv.folds = ()  # empty = range(data.num_folds)
    # Variants run beside the method on every fold (ablations): name -> dict(stages={stage:
    # fields merged over the method's}, until=last stage to run ("" = all)).
    c.cv.variants = config_dict.ConfigDict()
    c.cv.report = ""  # a lungjax.registry.CV_REPORTS key: the method's own tables

    # --- export ---------------------------------------------------------------------
    c.export = config_dict.ConfigDict()
    c.export.input_size_zyx = ()  # empty = data.patch_size_zyx; batch size is symbolic

    # --- method sections: read only by lungjax/methods/<method>.py -----------------------
    c.sathish2020 = config_dict.ConfigDict()
    c.sathish2020.alpha = 0.001  # weight of the Turing-test (adversarial) loss
    # Whole scans (stage kind "sathish2020_find", python -m lungjax.detect): lung = the
    # segmenter's probability >= lung_threshold, grown by wall_mm so patches on the lung
    # wall count; patches centred on a patch_stride grid inside it; a patch bears a
    # nodule when the classifier's probability >= patch_threshold.
    c.sathish2020.lung_threshold = 0.5
    c.sathish2020.wall_mm = 5.0
    c.sathish2020.patch_stride = 32
    c.sathish2020.patch_threshold = 0.5
    c.screening = config_dict.ConfigDict()  # shrey2020's suspicious-slice rule
    c.screening.threshold = 0.35  # a slice is suspicious when its max probability exceeds it
    # How a found nodule (a component of the U-Net's mask) is scored for its mark:
    # "peak" | "mean" | "volume" (lungjax.tasks.screening.NODULE_SCORES).
    c.screening.nodule_score = "peak"
    c.yu2021 = config_dict.ConfigDict()
    c.yu2021.subcases = 2  # sub-cases each case is split into along z
    c.yu2021.subcase_size_zyx = ()  # their size where not data.patch_size_zyx (empty: it)
    c.yu2021.epochs = 5.0  # segmentation epochs (one = every training sub-case once)
    c.yu2021.bce_epochs = 2.0  # epochs of BCE before the Dice loss takes over
    c.yu2021.lr_decay_epochs = (2.5, 3.75)  # epochs where the learning rate falls 10x
    c.yu2021.lung_only = True  # the held-out prediction is kept inside the lung mask
    c.yu2021.min_nodule_voxels = 2  # a new scan's nodule: a component of at least this
    c.yu2021.max_nodules = 20  # the most nodules kept per scan (highest score first)
    c.yu2021.nodule_score = "peak"  # a nodule's score (lungjax.tasks.screening.NODULE_SCORES)
    c.yu2021.large_nodule_mm = 10.0  # Dice is also reported for nodules at least this big
    c.yu2021.n_bootstrap = 1000  # bootstrap resamples of the held-out figures
    return c


def parse_variant(arg: str | None, variants: tuple[str, ...], where: str) -> tuple[str, dict]:
    """A method config's ``:arg``: ``"tiny,fold=3"`` -> ``("tiny", {"fold": "3"})``.

    The variant name is optional (the first of ``variants``, "default", when absent);
    ``key=value`` pairs are returned as strings for the config to interpret. ``where``
    (the config file) names the source of an error.
    """
    variant, kv = "", {}
    for p in [p for p in (arg or "").split(",") if p]:
        if "=" in p:
            k, v = p.split("=", 1)
            kv[k.strip()] = v.strip()
        elif not variant:
            variant = p.strip()
        else:
            raise ValueError(f"config arg {arg!r}: more than one variant name")
    variant = variant or variants[0]
    if variant not in variants:
        raise ValueError(f"{where}: unknown variant {variant!r} ({' | '.join(variants)})")
    return variant, kv
