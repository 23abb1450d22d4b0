"""Sparse feature circuits (Marks et al. 2024): splicing with error nodes, node and edge effects, evaluation."""
