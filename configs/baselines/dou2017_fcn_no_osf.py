"""Dou et al. 2017 ablation (Table 1 of the paper): the screening FCN trained without
online sample filtering (every sample of the batch contributes to the gradient).

The rest of the method is unchanged (ResNet+HL false-positive reduction on this FCN's
candidates). Same variants and arguments as ``configs/dou2017.py``::

    python -m lungjax.main --config=configs/baselines/dou2017_fcn_no_osf.py[:tiny|:paper]
"""

import importlib.util
import os


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location(
        "lungjax_configs_dou2017_common",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "_dou2017_common.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.dou2017_config(arg)
    c.name = c.name.replace("dou2017", "dou2017_fcn_no_osf", 1)
    c.train.osf.enabled = False
    return c
