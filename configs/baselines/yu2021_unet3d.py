"""Yu et al. 2021 baseline: the plain 3D U-Net (units conv-IN-ReLU twice, no shortcut)
in place of the 3D Res U-Net; the malignancy stages are the method's. Same variants and
arguments as configs/yu2021.py::

    python -m lungjax.main --config=configs/baselines/yu2021_unet3d.py[:tiny|:paper]
"""

import importlib.util
import os


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location(
        "lungjax_configs_yu2021",
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "yu2021.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.baseline_config("unet3d", arg)
