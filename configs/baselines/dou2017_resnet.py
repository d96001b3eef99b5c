"""Dou et al. 2017 ablation (Table 2 of the paper): ResNet: the residual stage-2 network, classification only (no hybrid loss).

Stage 1 is the method's (FCN with online sample filtering); only the false-positive
reduction network differs. Same variants and arguments as configs/dou2017.py::

    python -m lungjax.main --config=configs/baselines/dou2017_resnet.py[:tiny|:paper]
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
    c.name = c.name.replace("dou2017", "dou2017_resnet", 1)
    c.stage2.networks = ("resnet",)
    return c
