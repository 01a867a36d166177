"""Analysis: subspaces, ablations, statistics."""
