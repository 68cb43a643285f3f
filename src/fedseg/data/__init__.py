"""Data layer: case representation, readers, synthetic cohort, checks, partitions, transforms."""
