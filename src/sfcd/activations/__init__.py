"""Activations: harvesting from a model, streaming in bounded chunks, the chunk cache, plain activation files."""
