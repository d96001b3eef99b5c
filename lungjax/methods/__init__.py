"""Method-specific pieces that plug into the engine through the registries (samplers,
whole-scan detectors, cross-validation reports)."""
