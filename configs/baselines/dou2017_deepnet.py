"""Dou et al. 2017 ablation (Table 2 of the paper): DeepNet: the stage-2 network without identity shortcuts or regression branch.

Stage 1 is the method's (FCN with online sample filtering); only the false-positive
reduction network differs. Same variants and arguments as configs/dou2017.py::

    python -m lungjax.main --config=configs/baselines/dou2017_deepnet.py[:tiny|:paper]
"""

import os
import runpy


def get_config(arg=None):
    common = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "_dou2017_common.py"))
    return common["ablation_config"]("deepnet", arg)
