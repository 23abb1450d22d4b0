"""Sparse autoencoders: architectures on a shared base, files, training and evaluation."""
