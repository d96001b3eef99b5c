"""Shrey et al. 2020 comparison classifier: fully connected network on the flattened crop (Table 1).

The U-Net and screening stages are the method's; the classify stage trains this
network on the same two-channel {image, predicted mask} crops. Same variants and
arguments as configs/shrey2020.py::

    python -m lungjax.main --config=configs/baselines/shrey2020_fc_net.py[:tiny|:paper]
"""

import os
import runpy


def get_config(arg=None):
    common = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "_shrey2020_common.py"))
    return common["baseline_config"]("fc_net", arg)
