"""Pruning methods besides CTS: the saliency baselines, LTR, sanity checks, effective sparsity and ticket files."""
