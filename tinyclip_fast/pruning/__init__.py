"""Automatic weight inheritance: hard-concrete masks, sparsity control, the masked CLIP."""
