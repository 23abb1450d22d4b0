"""Development across training: feature matching, lineage, circuits through training."""
