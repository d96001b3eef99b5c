"""The dou2017 ablation configs of this folder, built by name from ``configs/dou2017.py``.

Each ``dou2017_<name>.py`` here is a ``--config=`` target whose ``get_config(arg)`` returns
``ablation_config("<name>", arg)`` of this file (loaded with ``runpy``: config files are not
a package): the method's config (same variants and ``key=value`` args as
``configs/dou2017.py``) with one thing changed.
"""

import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def _stage2(name):
    """Stage 2 as the network ``name``; one without the hybrid loss regresses no diameter,
    so its marks are not merged within one (``stages.classify.merge_within_diameter``)."""
    def change(c):
        c.stages.fpr.sections.model.name = name
        c.stages.classify.merge_within_diameter = False
    return change


# name -> the one change from the method (Tables 1 and 2 of the paper).
ABLATIONS = {
    "fcn_no_osf": lambda c: setattr(c.train.osf, "enabled", False),
    "deepnet": _stage2("dou2017_fpr_deepnet"),
    "resnet": _stage2("dou2017_fpr_resnet"),
    "resnet_hl": lambda c: setattr(c.stages.fpr.sections.model, "name",
                                   "dou2017_fpr_resnet_hl"),
}


def dou2017_config(arg):
    """``configs/dou2017.py``'s ``get_config(arg)``."""
    spec = importlib.util.spec_from_file_location("lungjax_configs_dou2017",
                                                  os.path.join(os.path.dirname(_HERE),
                                                               "dou2017.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def ablation_config(name, arg=None):
    """The ablation ``name`` (an ``ABLATIONS`` key) of the dou2017 variant ``arg``.

    Its run name is the method's with "dou2017" replaced by "dou2017_<name>" (e.g.
    "dou2017_deepnet_tiny"), so its default workdir differs from the method's.
    """
    if name not in ABLATIONS:
        raise ValueError(f"configs/baselines/_dou2017_common.py: unknown ablation {name!r} "
                         f"({' | '.join(ABLATIONS)})")
    c = dou2017_config(arg)
    c.name = c.name.replace("dou2017", f"dou2017_{name}", 1)
    ABLATIONS[name](c)
    return c
