"""Loads ``configs/dou2017.py`` for the dou2017 ablation configs in this folder."""

import importlib.util
import os


def dou2017_config(arg):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "dou2017.py")
    spec = importlib.util.spec_from_file_location("lungjax_configs_dou2017", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)
