"""Xie (arXiv 1807.05972, 2018), ablation "fixed anchors": the same detector, targets,
schedule and folds as ``configs/xie2018.py``, but the sampling anchors stay the
ground-truth nodules for the whole run (no provisional tests, no false-positive anchors).
The paper reports CPM 0.9207 for it against 0.9351 with anchor updates.

    python -m lungjax.main --config=configs/baselines/xie2018_fixed_anchors.py[:tiny|paper] \
        [--mode=cv]

``--mode=cv`` of ``configs/xie2018.py`` trains this ablation itself (into
``<workdir>/fixed_anchors``) for its Table 1; this file runs it alone. Variants and
``key=value`` args are those of ``configs/xie2018.py``.
"""

import importlib.util
import os


def get_config(arg=None):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "xie2018.py")
    spec = importlib.util.spec_from_file_location("lungjax_configs_xie2018", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    # The same change as the method's cv variant "fixed_anchors" (which --mode=cv runs).
    c.name = f"{c.name}_fixed_anchors"
    c.sampler.update_anchors = False
    c.cv.variants = {}
    c.cv.report = ""
    return c
