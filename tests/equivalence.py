"""What two paths that compute the same thing in different arithmetic may be asked to agree on.

Across processes, thread counts, batched against single, or CPU kernels (AVX-512, AVX2 and torch's
unvectorised ``default``), float sums are taken in another order. A search's logits then differ in
the last bits, Adam amplifies that, and weights whose scores lie within rounding of the threshold
swap places. So such tests assert what the maths guarantees (docs/architecture.md, "What is
bit-exact where"):

* the kept count, exactly (the top-k takes a fixed number of weights, whatever the scores);
* losses, gradients and weights within a float tolerance;
* masks overlapping above a stated fraction.

Bit equality is asserted only where the same arithmetic runs twice in one process (resume tests).
Tests that compare two paths carry the ``cross_path`` marker, and ``.ci/run`` runs them once more
under ``ATEN_CPU_CAPABILITY=default`` to catch a new bit-exactness assumption on any CI machine.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# Masks of two paths share at least this fraction of their kept weights. Measured on an AVX2 EPYC
# (2026-12-03, `pytest -m cross_path` under ATEN_CPU_CAPABILITY=avx2 and =default): the smoke and
# LeNet searches over one process and two kept 97-100 % of the same weights; the spread of the
# plain path itself (one process at 1 and 2 threads) is of the same size. 0.9 leaves room for
# another CPU while still failing a path that ranks weights differently (a wrong objective or
# budget keeps well under half of the same weights at these densities).
MIN_MASK_OVERLAP = 0.9


def kept_counts(mask: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(keep.sum()) for name, keep in mask.items()}


def mask_overlap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """The fraction of ``a``'s kept weights that ``b`` keeps too (1.0 for identical masks)."""
    assert sorted(a) == sorted(b), f"different layers: {sorted(a)} against {sorted(b)}"
    kept = sum(int(keep.sum()) for keep in a.values())
    shared = sum(int((a[name].bool() & b[name].bool()).sum()) for name in a)
    return shared / kept if kept else 1.0


def assert_equivalent_masks(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *,
                            min_overlap: float = MIN_MASK_OVERLAP, what: str = "masks") -> None:
    """The same total kept count, to the weight, and at least ``min_overlap`` of it shared."""
    total_a, total_b = sum(kept_counts(a).values()), sum(kept_counts(b).values())
    assert total_a == total_b, f"{what}: {total_a} kept weights against {total_b}"
    overlap = mask_overlap(a, b)
    import os  # TEMP measurement
    if os.environ.get("CTS_OVERLAP_LOG"):
        with open(os.environ["CTS_OVERLAP_LOG"], "a") as f:
            f.write(f"{what} {overlap:.5f} {os.environ.get('PYTEST_CURRENT_TEST')}\n")
    assert overlap >= min_overlap, f"{what}: only {overlap:.3f} of the kept weights are shared (at least {min_overlap})"
