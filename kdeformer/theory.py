"""The theory view of one kde_attention call: what was estimated, next to the exact quantities.

For small N (it materialises Nq x Nk). Used by the widgets' error panel and the notebooks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .metrics import normalizer_relative_error, relative_spectral_error, theory_spectral_error
from .sampling import value_row_norms
from .trace import KDETrace


@dataclass
class TheoryView:
    """Estimated versus exact, per head (leading dims `...` as in the trace).

    log_normalizer        (..., Nq)      estimated log D~
    exact_log_normalizer  (..., Nq)      exact log D
    group_probs           (..., ng, Nk)  the sampling distributions used
    oracle_group_probs    (..., ng, Nk)  the distributions the theory asks for: per group, proportional to
                                         ||column j of D^-1 A over the group's queries|| * ||[v_j, 1]||,
                                         zero on the columns computed exactly for the whole group
    relative_error        (...)          ||O~ - O||_2 / ||O||_2
    theory_error          (...)          ||O~ - O||_2 / (||D^-1 A||_2 ||V||_2), the paper's form
    normalizer_error      (...)          mean over queries of |D~_i / D_i - 1|
    total_variation       (...)          mean over groups of TV(group_probs, oracle_group_probs)
    """

    log_normalizer: torch.Tensor
    exact_log_normalizer: torch.Tensor
    group_probs: torch.Tensor
    oracle_group_probs: torch.Tensor
    relative_error: torch.Tensor
    theory_error: torch.Tensor
    normalizer_error: torch.Tensor
    total_variation: torch.Tensor


def oracle_group_probabilities(attention: torch.Tensor, value: torch.Tensor, trace: KDETrace) -> torch.Tensor:
    """Per-group optimal sampling distribution from the exact softmax matrix.  -> (..., ng, Nk)

    attention (..., Nq, Nk) exact D^-1 A; value (..., Nk, Dv). Entries a query computes exactly are
    removed before taking column norms (they need no samples).
    """
    residual = attention.to(torch.float64) * ~trace.heavy_mask()  # (..., Nq, Nk)
    ng, n_k = trace.num_groups, attention.shape[-1]
    member = trace.q_groups.unsqueeze(-2) == torch.arange(ng, device=attention.device).view(ng, 1)  # (..., ng, Nq)
    col_sq = member.to(torch.float64) @ residual.square()  # (..., ng, Nk)
    v_norm = value_row_norms(value.to(torch.float64)).unsqueeze(-2)  # (..., 1, Nk)
    weight = col_sq.sqrt() * v_norm
    total = weight.sum(-1, keepdim=True)
    uniform = torch.full_like(weight, 1.0 / n_k)
    return torch.where(total > 0, weight / total.clamp_min(1e-300), uniform)


def theory_view(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor, trace: KDETrace) -> TheoryView:
    """Compare one call's estimates with the exact quantities (small N only)."""
    from .exact import exact_attention

    exact, exact_trace = exact_attention(
        query, key, value, scale=trace.scale, key_mask=trace.key_mask, return_trace=True
    )
    attention = exact_trace.attention_matrix()  # (..., Nq, Nk)
    oracle = oracle_group_probabilities(attention, value, trace)
    return TheoryView(
        log_normalizer=trace.log_normalizer,
        exact_log_normalizer=exact_trace.log_normalizer,
        group_probs=trace.group_probs,
        oracle_group_probs=oracle,
        relative_error=relative_spectral_error(output, exact, reduction="none"),
        theory_error=theory_spectral_error(output, exact, attention, value, reduction="none"),
        normalizer_error=normalizer_relative_error(trace.log_normalizer, exact_trace.log_normalizer, reduction="none"),
        total_variation=0.5 * (trace.group_probs.to(torch.float64) - oracle).abs().sum(-1).mean(-1),
    )
