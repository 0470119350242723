"""Counter-based random numbers: a draw depends on (seed, stream, head, index) and nothing else.

`torch.Generator` streams hand out numbers in call order, so the draws of head 3 change when the batch
grows, when padding lengthens a sequence, or when a later block needs one more number. KDEformer's
promises (padding and batch size are invisible, a later token never changes an earlier output, one
seed draws the same columns in every dtype) need draws that are addressed, not consumed: here every
number is a hash of its address, computed with wrapping int64 arithmetic (splitmix64's mixer), so

    Draws(seed, heads).uniform("samples", (ng, s))[g, i, j]

is the same number whatever G, Nk, the dtype or the device. The caller's generator is used once per
call, to draw the seed; the same generator state gives the same seed and so the same draws.

Shape legend: G groups (batch x heads, flattened), `heads` (G,) the head index of each group.
"""
from __future__ import annotations

import functools
import math
import zlib

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A 64-bit unsigned constant as the int64 torch stores."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping multiplication): a bijective 64-bit hash."""
    return mix64_(x.clone())


def mix64_(x: torch.Tensor) -> torch.Tensor:
    """`mix64` in place on x (one scratch buffer instead of a fresh tensor per operation)."""
    scratch = torch.empty_like(x)
    for bits, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(x, bits, out=scratch).bitwise_and_((1 << (64 - bits)) - 1)  # logical shift
        x.bitwise_xor_(scratch)
        if factor is not None:
            x.mul_(factor)
    return x


def mix64_int(x: int) -> int:
    """`mix64` of one Python int (64-bit wrapping arithmetic), for keys that need no tensor."""
    x &= _MASK64
    for bits, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
        x ^= x >> bits
        if factor is not None:
            x = (x * (factor & _MASK64)) & _MASK64
    return x


@functools.lru_cache(maxsize=64)
def index_hash(count: int, device) -> torch.Tensor:
    """mix64(i * golden + 1) for i < count: the address part that depends on the index alone (the same
    for every seed, stream and head, so it is computed once per size).  # (count,) int64, read-only use"""
    index = torch.arange(count, device=device, dtype=torch.int64)
    return mix64_(index.mul_(_GOLDEN).add_(1))


def stream_id(name: str) -> int:
    """A fixed integer for a stream name (crc32: the same in every process and version)."""
    return zlib.crc32(name.encode())


def head_index(lead: tuple[int, ...], device) -> torch.Tensor:
    """Head of each group: the last leading dim is the head dim, every other leading dim shares its
    draws (batch items draw alike).  # (G,)"""
    groups = math.prod(lead)
    heads = lead[-1] if lead else 1
    return torch.arange(groups, device=device) % heads


class Draws:
    """Uniform and normal numbers addressed by (stream, head, index), for G groups at once."""

    def __init__(self, seed: int, heads: torch.Tensor):
        self.seed = int(seed) & _MASK64
        self.heads = heads  # (G,) int64

    @classmethod
    def from_generator(cls, generator: torch.Generator | None, heads: torch.Tensor) -> "Draws":
        """One 63-bit seed from `generator` (the global generator when None)."""
        seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, device="cpu" if generator is None else generator.device)
        return cls(int(seed.item()), heads)

    def subset(self, groups: torch.Tensor) -> "Draws":
        """The same draws for a subset of the groups (their heads keep their streams)."""
        return Draws(self.seed, self.heads[groups])

    def _bits(self, stream: str, shape: tuple[int, ...]) -> torch.Tensor:
        """64 random bits per address.  # (G, *shape) int64"""
        base = _signed(mix64_int(self.seed + stream_id(stream) * _GOLDEN))  # the stream's key, one int
        per_head = mix64_((self.heads + 1) * _GOLDEN + base)  # (G,)
        count = math.prod(shape)
        bits = mix64_(per_head.unsqueeze(-1) ^ index_hash(count, self.heads.device))  # (G, count)
        return bits.view(-1, *shape)

    def uniform(self, stream: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform numbers in (0, 1), float64 (53 random bits each).  # (G, *shape)"""
        top = _shift_right(self._bits(stream, shape), 11).to(torch.float64)
        return top.add_(0.5).mul_(2.0**-53)

    def normal(self, stream: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal numbers (Box-Muller on two uniforms), float32.  # (G, *shape)"""
        u = self.uniform(stream, (*shape, 2))
        radius = torch.sqrt(-2.0 * torch.log(u[..., 0]))
        return (radius * torch.cos(2.0 * math.pi * u[..., 1])).to(torch.float32)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw indices from each row's distribution by inverting its CDF (float64 cumulative sums).

    probs (..., N) >= 0, uniforms (..., s) in (0, 1) -> indices (..., s) int64 with P(j) = probs_j / sum.
    Indices with zero probability are never returned.
    """
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)  # (..., N)
    total = cdf[..., -1:]
    index = torch.searchsorted(cdf, uniforms * total, right=True)  # (..., s) first i with cdf_i > u total
    # u total < total gives an index with cdf_i > cdf_(i-1), i.e. probs_i > 0. Only u total rounding up to
    # the total finds none (index N); that draw takes the last index of positive probability. It is
    # looked up only then: a full pass over probs per row otherwise (same draws either way).
    over = index == probs.shape[-1]  # (..., s)
    if bool(over.any()):
        positions = torch.arange(probs.shape[-1], device=probs.device)
        last = torch.where(probs > 0, positions, 0).amax(-1, keepdim=True)  # (..., 1) last drawable index
        index = torch.where(over, last, index)
    return index
