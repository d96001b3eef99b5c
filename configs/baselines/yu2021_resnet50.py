"""Yu et al. 2021 baseline: the plain 3D ResNet50 (the 2D network with every kernel made
cubic: 7x7x7 stride-2 stem, max-pool, 3x3x3 middle kernels) in place of the paper's
3D ResNet50; the segmentation stages are the method's. Same variants and arguments as
configs/yu2021.py::

    python -m lungjax.main --config=configs/baselines/yu2021_resnet50.py[:tiny|:paper]
"""

import importlib.util
import os


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location(
        "lungjax_configs_yu2021",
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "yu2021.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.baseline_config("resnet50", arg)
