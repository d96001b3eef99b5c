"""Shrey et al. 2020 comparison classifier: DenseNet121, 2D, trained from scratch (Table 2).

The U-Net and screening stages are the method's; the classify stage trains this
network on the same two-channel {image, predicted mask} crops. Same variants and
arguments as configs/shrey2020.py::

    python -m lungjax.main --config=configs/baselines/shrey2020_densenet121.py[:tiny|:paper]
"""

import os
import runpy


def get_config(arg=None):
    common = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "_shrey2020_common.py"))
    return common["baseline_config"]("densenet121", arg)
