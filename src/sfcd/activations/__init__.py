"""Activations: harvesting from a model, the on-disk cache, plain activation files, the mixing buffer."""
