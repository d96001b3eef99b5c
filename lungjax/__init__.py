"""lungjax: lung-nodule CAD pipelines for chest CT in JAX/Flax."""

__version__ = "0.1.0"
