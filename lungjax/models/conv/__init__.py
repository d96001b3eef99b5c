"""CPU-fast convolution behind ``lungjax.models.layers.Conv``: formulations and their choice."""
