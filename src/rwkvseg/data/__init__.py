"""Dataset readers, splits, transforms and preprocessing."""
