"""Concrete Ticket Search (Arora & Teuscher, arXiv:2512.07142): learn which weights of ``θ_k`` to keep.

One real logit ``s_i`` per prunable weight, initialised to ``logit(κ)``. Each step draws one
uniform ``u`` per weight (shared by the whole mini-batch), forms the Binary Concrete soft mask
``m̃ = σ(s + L/τ)`` with ``L = log u − log(1 − u)`` and the fixed temperature ``τ = 2/3``, and runs
the frozen network with weights ``θ_k ⊙ m̃``. The objective compares that network with the same
weights unmasked (the "dense teacher"); both forwards normalise with the batch's statistics.
GradBalance keeps the expected kept count ``Σσ(s)`` near a budget of ``1.1·κ·d`` without a tuned
penalty, and the mask is the global top ``round(κ·d)`` logits at the end.

One module per concept:

- :mod:`.objectives`: the objectives and their registry (:data:`OBJECTIVES`);
- :mod:`.config`: :class:`SearchConfig` and the length and learning-rate schedule;
- :mod:`.balance`: GradBalance and the Lagrangian ablation;
- :mod:`.relaxation`: the Binary Concrete relaxation (:class:`ConcreteMask`);
- :mod:`.forwards`: batch statistics and the stacked and vmap forwards of K rows;
- :mod:`.search`: the step and the loop (:func:`concrete_search`);
- :mod:`.probes`: the timings of the stacked forms against one at a time (``auto`` settings);
- :mod:`.rank_rows`, :mod:`.seed_rows`: a process's virtual ranks, and several seeds, as rows of one step.

The constants are the method's, not knobs: see ``docs/method.md`` of the shared notes. Each lives
in the module that uses it; this package re-exports the names callers use.
"""

from .balance import (
    BALANCERS,
    BUDGET_SLACK,
    CONSTRAINT_SCALE,
    MULTIPLIER_EMA,
    GradBalance,
    Lagrangian,
    make_balancer,
)
from .config import (
    LR_DROP_AT,
    LR_DROP_FACTOR,
    SCHEDULES,
    SEARCH_LENGTHS,
    SHORT_SEARCH_FRACTION,
    SearchConfig,
)
from .forwards import batch_statistics
from .objectives import (
    FEATURE_CAPTURES,
    OBJECTIVES,
    Objective,
    activation_mse,
    cross_entropy,
    feature_mse,
    forward_kl,
    grad_mse,
    gradient_norm,
    loss_ratio,
    reverse_kl,
)
from .probes import seed_rows_ratio, stacked_search_ratio
from .relaxation import NOISE_EPS, TEMPERATURE, ConcreteMask, concrete_noise, logit, soft_mask
from .search import (
    SearchResult,
    concrete_search,
    frozen_for_search,
    search_step,
)

__all__ = [
    "BALANCERS", "BUDGET_SLACK", "CONSTRAINT_SCALE", "LR_DROP_AT", "LR_DROP_FACTOR", "MULTIPLIER_EMA",
    "FEATURE_CAPTURES", "NOISE_EPS", "OBJECTIVES", "SCHEDULES", "SEARCH_LENGTHS", "SHORT_SEARCH_FRACTION", "TEMPERATURE", "ConcreteMask",
    "GradBalance", "Lagrangian", "Objective", "SearchConfig", "SearchResult", "batch_statistics",
    "activation_mse", "concrete_noise", "concrete_search", "cross_entropy", "feature_mse", "forward_kl", "frozen_for_search", "grad_mse", "gradient_norm",
    "logit", "loss_ratio", "make_balancer", "reverse_kl", "search_step", "seed_rows_ratio", "soft_mask",
    "stacked_search_ratio",
]
