"""Locality-sensitive hashing and sorted-block pairing shared by HyperAttention, Reformer and ScatterBrain.

Two hash families:
  * sign codes (SimHash): bit i = [<x, r_i> > 0] for r Gaussian directions; buckets ordered along a
    Gray sequence so that neighbouring buckets differ in one bit (HyperAttention's sortLSH);
  * angular buckets (Reformer): bucket = argmax over [xR, -xR] for a Gaussian R with b/2 columns.
Tokens are sorted by bucket and cut into balanced blocks; query block t is paired with key block t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import draw_projections, hash_codes, inverse_gray_code
from ._common import gather_rows


# SimHash pieces are the core's own steps (one implementation for KDEformer and HyperAttention).
gaussian_directions = draw_projections  # (G, D, r) drawn in float32, as the core does
sign_codes = hash_codes  # x (G, N, D), directions (G, D, r) -> (G, N) int64 codes
gray_rank = inverse_gray_code  # position of each code in the reflected Gray sequence


def angular_buckets(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Reformer's angular LSH: argmax over [xR, -xR].  x (G, N, D), rotation (G, D, b/2) -> (G, N) in [0, b)."""
    rotated = x @ rotation  # (G, N, b/2)
    top, top_at = rotated.max(-1)  # best of xR
    low, low_at = rotated.min(-1)  # best of -xR is -min(xR); no concatenated copy needed
    return torch.where(top >= -low, top_at, low_at + rotation.shape[-1])


def sort_tokens(sort_key: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Stable sort by key (ties keep token order); masked tokens go last.  (G, N) -> order (G, N)."""
    if valid is not None:
        sort_key = torch.where(valid, sort_key, sort_key.max() + 1)
    return torch.sort(sort_key, dim=-1, stable=True).indices


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """position[g, order[g, p]] = p.  (G, N) -> (G, N)."""
    pos = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


@dataclass
class Blocks:
    """Sorted queries and keys cut into nb balanced blocks; query block t meets key block t.

    Query block t covers the sorted positions [floor(t Nq / nb), floor((t+1) Nq / nb)) (sizes differ by at
    most one).  Key block t covers the sorted *unmasked* positions [start_t, end_t) with
    start_t = floor(t n / nb), end_t = max(floor((t+1) n / nb), start_t + 1), n = unmasked keys of the
    head: balanced, never empty (with fewer keys than blocks, neighbouring blocks share one key).  Both
    sides are cut by the same rule, so in self-attention (Nq = n) query block t holds exactly the tokens
    of key block t, and every query meets its own key.
    Why this is not the core's rule (kdeformer.core.plan_blocks, full blocks of ceil(Nk / nb) and a short last
    one, on keys with the masked ones removed first): the peers keep their papers' layout — masked keys
    sorted last inside the same tensors — and Reformer's chunks and ScatterBrain's support need query block t
    to hold exactly the tokens of key block t, which only one shared floor cut of both sides guarantees.
    """

    num_blocks: int  # nb
    q_slots: int  # Bq = ceil(Nq / nb)
    k_slots: int  # K = ceil(Nk / nb) >= every key block's size
    q_index: torch.Tensor  # (G, nb, Bq) token index of each query slot (padding slots repeat a query)
    q_flat: torch.Tensor  # (G, Nq) position (t * Bq + slot) of each query token in the block layout
    q_block: torch.Tensor  # (G, Nq) block of each query token
    k_index: torch.Tensor  # (G, nb, K) token index of each key slot
    k_valid: torch.Tensor  # (G, nb, K) slot holds a key of the block
    k_start: torch.Tensor  # (G, nb) first sorted position of each key block
    k_end: torch.Tensor  # (G, nb) one past its last
    k_pos: torch.Tensor  # (G, Nk) sorted position of each key token (>= n for masked keys)


def make_blocks(q_order: torch.Tensor, k_order: torch.Tensor, n_valid: torch.Tensor, num_blocks: int) -> Blocks:
    groups, n_q = q_order.shape
    n_k = k_order.shape[1]
    device = q_order.device
    nb = num_blocks
    t = torch.arange(nb, device=device)  # (nb,)
    # queries: balanced cut of the Nq sorted positions
    q_slots = -(-n_q // nb)
    q_start = (t * n_q) // nb  # (nb,)
    slot = torch.arange(q_slots, device=device)  # (Bq,)
    q_sorted_pos = (q_start.unsqueeze(-1) + slot).clamp_max(n_q - 1)  # (nb, Bq)
    q_index = q_order[:, q_sorted_pos.flatten()].view(groups, nb, q_slots)  # (G, nb, Bq)
    u = torch.arange(n_q, device=device)  # sorted query positions
    u_block = ((u + 1) * nb + n_q - 1) // n_q - 1  # (Nq,) last block starting at or before u
    u_flat = u_block * q_slots + (u - q_start[u_block])  # (Nq,)
    q_flat = torch.empty_like(q_order).scatter_(1, q_order, u_flat.expand(groups, n_q))  # (G, Nq)
    q_block = torch.empty_like(q_order).scatter_(1, q_order, u_block.expand(groups, n_q))
    # keys: balanced cut of each head's n unmasked sorted positions, no block empty
    n = n_valid.view(-1, 1)  # (G, 1)
    k_start = (t * n) // nb  # (G, nb)
    k_end = torch.maximum(((t + 1) * n) // nb, k_start + 1)
    k_slots = -(-n_k // nb)
    pos = k_start.unsqueeze(-1) + torch.arange(k_slots, device=device)  # (G, nb, K)
    k_valid = pos < k_end.unsqueeze(-1)
    pos = torch.where(k_valid, pos, 0)
    k_index = torch.gather(k_order, 1, pos.flatten(1)).view(groups, nb, k_slots)
    k_pos = inverse_permutation(k_order)
    return Blocks(nb, q_slots, k_slots, q_index, q_flat, q_block, k_index, k_valid, k_start, k_end, k_pos)


def unblock_queries(x: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """Rows computed per query slot back to token order.  x (G, nb, Bq, C) -> (G, Nq, C)."""
    groups = x.shape[0]
    return gather_rows(x.reshape(groups, -1, x.shape[-1]), blocks.q_flat)


def in_block(blocks: Blocks, sorted_pos: torch.Tensor) -> torch.Tensor:
    """Whether keys at sorted positions belong to each key block.  sorted_pos (G, S) -> (G, nb, S) bool."""
    p = sorted_pos.unsqueeze(1)  # (G, 1, S)
    return (p >= blocks.k_start.unsqueeze(-1)) & (p < blocks.k_end.unsqueeze(-1))
