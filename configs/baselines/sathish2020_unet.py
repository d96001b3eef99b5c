"""Sathish et al. 2020 baseline: lung segmentation by U-Net, trained on the method's
slices with its schedule and the task loss alone (no adversary), scored by the same
segmentation evaluator (Dice, pixel AUC, Hausdorff distance in mm). Segmentation only.
Same variants and arguments as configs/sathish2020.py::

    python -m lungjax.main --config=configs/baselines/sathish2020_unet.py[:tiny|:paper]
"""

import os
import runpy


def get_config(arg=None):
    method = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "sathish2020.py"))
    return method["get_config"](arg, segmenter="unet", adversary=False)
