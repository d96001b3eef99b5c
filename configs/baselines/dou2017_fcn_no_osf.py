"""Dou et al. 2017 ablation (Table 1 of the paper): the screening FCN trained without
online sample filtering (every sample of the batch contributes to the gradient).

The rest of the method is unchanged (ResNet+HL false-positive reduction on this FCN's
candidates). Same variants and arguments as ``configs/dou2017.py``::

    python -m lungjax.main --config=configs/baselines/dou2017_fcn_no_osf.py[:tiny|:paper]
"""

import os
import runpy


def get_config(arg=None):
    common = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "_dou2017_common.py"))
    return common["ablation_config"]("fcn_no_osf", arg)
