"""Shared body of the Shrey et al. 2020 baseline-classifier configs: the method's stages
(same U-Net, same screening, same two-channel {image, predicted mask} crops, same
optimiser and schedule) with only the classify stage's network replaced."""

import os
import runpy


def baseline_config(name: str, arg=None):
    """configs/shrey2020.py's config (same variants and ``key=value`` args) whose
    ``classify`` stage trains the baseline ``name`` (a key of its ``BASELINES``) and
    whose cross-validation runs no further variants."""
    method = runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "shrey2020.py"))
    c = method["get_config"](arg)
    model, args, small = method["BASELINES"][name]
    tiny = c.name.endswith("_tiny")
    sections = c.stages.classify.sections
    sections.model.classifier = model
    sections.model.classifier_args = small if tiny else args
    c.name = c.name.replace("shrey2020", f"shrey2020_{name}", 1)
    c.cv.variants = {}
    return c
