"""Randomness of the stochastic solvers: a ``torch.Generator`` or counter-based per-sample streams, and the
Brownian memory that lets an adaptive SDE solver reject a step without redrawing its noise.

Every stochastic solver takes ``generator`` (reproducible, but the numbers a sample receives depend on its position
in the batch and on the batch size) or ``seeds`` (one integer per sample: counter-based noise, see `seeded_normal`,
so that a sample's path depends only on its own seed and start point, never on its batch-mates). With neither,
torch's global generator is used.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from .._utils import bcast

Seeds = Union[Sequence[int], torch.Tensor]

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2^32 for int64 ``x`` in [0, 2^32) without int64 overflow (m split into 16-bit halves)."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xorshift-multiply, the constants of the "lowbias32" mixer)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _lane(seed_lo: torch.Tensor, seed_hi: torch.Tensor, counter: torch.Tensor, stream: int, salt: int) -> torch.Tensor:
    h = _mix32(seed_lo ^ salt)
    h = _mix32(h ^ seed_hi)
    h = _mix32(h ^ counter)
    return _mix32(h ^ (stream & _MASK32))


def seeded_normal(
    seeds: torch.Tensor,
    counter: int | torch.Tensor,
    stream: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal numbers that are a pure function of (seed, counter, stream, element index).

    ``seeds`` is a ``[batch]`` int64 tensor (any 64-bit values), ``counter`` an int or a ``[batch]`` tensor (e.g.
    the step index of each sample), ``stream`` an int that separates independent uses within a step; ``shape`` is
    the full shape ``[batch, ...]``. Row i depends only on (seeds[i], counter[i], stream): this is what makes a
    sample's noise independent of its batch-mates and of the batch size. No Python loop over the batch.

    Construction: two independent 32-bit lanes, each a chain of a bijective 32-bit integer hash over the seed's
    two halves, the counter and the stream, then hashed twice more with the element index; the lanes give two
    uniforms u1, u2 in (0, 1) (resolution 2^-32) and z = sqrt(-2 log u1) cos(2 pi u2) (Box-Muller). Two noise
    vectors coincide only if both 32-bit lanes collide.
    """
    dev = seeds.device if device is None else torch.device(device)
    seeds = seeds.to(device=dev, dtype=torch.int64)
    B = seeds.shape[0]
    n = math.prod(shape[1:])
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    if torch.is_tensor(counter):
        c = counter.to(device=dev, dtype=torch.int64).expand(B) & _MASK32
    else:
        c = torch.full((B,), int(counter) & _MASK32, dtype=torch.int64, device=dev)
    e = torch.arange(n, dtype=torch.int64, device=dev)
    bits = []
    for salt, esalt in ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344)):  # digits of pi as salts
        k = _lane(lo, hi, c, stream, salt)  # [B]
        eh = _mix32(e ^ esalt)  # [n]
        bits.append(_mix32(_mix32(k[:, None] ^ eh[None, :]) ^ esalt))  # [B, n]
    fdtype = torch.float32 if dev.type == "mps" else torch.float64
    u1 = (bits[0].to(fdtype) + 0.5) * 2.0**-32
    u2 = (bits[1].to(fdtype) + 0.5) * 2.0**-32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)
    return z.reshape(tuple(shape)).to(dtype)


class Noise:
    """Standard normal draws shaped like ``x`` from a generator, or per-sample counter-based streams (seeds)."""

    def __init__(self, x: torch.Tensor, generator: torch.Generator | None, seeds: Seeds | None) -> None:
        self.dtype, self.device = x.dtype, x.device
        self.generator = generator
        self.seeds: torch.Tensor | None = None
        if seeds is not None:
            if generator is not None:
                raise ValueError("give either generator or seeds, not both")
            vals = seeds.tolist() if torch.is_tensor(seeds) else list(seeds)
            if len(vals) != x.shape[0]:
                raise ValueError(f"seeds must hold one integer per sample: got {len(vals)} for batch size {x.shape[0]}")
            ints = []
            for v in vals:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"seeds must be integers, got {type(v).__name__}")
                ints.append(((v & 0xFFFFFFFFFFFFFFFF) ^ 0x8000000000000000) - 0x8000000000000000)  # as signed 64-bit
            self.seeds = torch.tensor(ints, dtype=torch.int64, device=x.device)

    def __call__(self, shape: Sequence[int], counter: int | torch.Tensor = 0, stream: int = 0,
                 seeds: torch.Tensor | None = None, std: float = 1.0) -> torch.Tensor:
        """N(0, std^2 I) of ``shape`` ([batch, ...]); with seeds, row i is a function of (seeds[i], counter[i],
        stream). ``seeds`` overrides the stored ones (the rows still being solved, when a batch has been compacted).
        A ``std`` other than 1 scales the draw in the same kernel (the generator's numbers are those of std = 1)."""
        seeds = self.seeds if seeds is None else seeds
        if seeds is None:
            if std == 1.0:
                return torch.randn(tuple(shape), generator=self.generator, dtype=self.dtype, device=self.device)
            return torch.normal(0.0, std, tuple(shape), generator=self.generator, dtype=self.dtype,
                                device=self.device)
        z = seeded_normal(seeds, counter, stream, shape, self.dtype, self.device)
        return z if std == 1.0 else z.mul_(std)



class BrownianMemory:
    """Per-sample memory of the Brownian path ahead of each sample's current time.

    Sample b remembers up to ``depth`` points of its Brownian path beyond its current time: the distance
    U[b, k] > 0 from the current time and the value W[b, k] relative to the current point, in unordered slots
    (``valid`` marks the used ones). These are values of one fixed Brownian path that an earlier, rejected attempt
    has already looked at, so later queries must agree with them (Rackauckas & Nie 2017, "rejection sampling
    with memory"). ``increment(h)`` returns W(h), the increment over the next h:

    * if a remembered point lies at h, its value;
    * else, if one lies beyond h, a Brownian-bridge sample between the nearest remembered points a < h < b
      (a = the current point if none is nearer): W(h) = W_a + (h - U_a)/(U_b - U_a) (W_b - W_a)
      + sqrt((h - U_a)(U_b - h)/(U_b - U_a)) xi;
    * else a fresh increment from the farthest remembered point: W(h) = W_a + sqrt(h - U_a) xi;

    and remembers the new point. ``advance()`` moves accepted samples to their new time (distances shrink by h,
    values are re-referenced to W(h), points now behind are forgotten); after a rejection everything stays, so
    the shorter retry is bridged inside the increment that was drawn, and a step accepted later sees the same
    path. Every query is answered by one Brownian path, so the accepted steps are driven by a genuine Brownian
    motion whatever the accept/reject decisions (which depend on that path); redrawing after a rejection (the
    reference code) keeps only the draws that led to small errors and biases the noise. When all ``depth`` slots
    are full the new point is not remembered (``overflows`` counts this per sample; it takes about ``depth``
    rejections in a row): the retry after it re-bridges inside (a, b), a small-scale loss that keeps the far
    points, which carry the large-scale path, exact.
    """

    def __init__(self, x: torch.Tensor, depth: int, tdtype: torch.dtype) -> None:
        B = x.shape[0]
        self.U = torch.zeros(B, depth, dtype=tdtype, device=x.device)
        self.valid = torch.zeros(B, depth, dtype=torch.bool, device=x.device)
        self.W = torch.zeros((B, depth) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        self.k = torch.arange(depth, device=x.device)[None, :]
        self.rel = 1e-9 if tdtype == torch.float64 else 1e-5
        self.overflows = torch.zeros(B, dtype=torch.long, device=x.device)
        self._dw: torch.Tensor | None = None

    def _at(self, idx: torch.Tensor) -> torch.Tensor:
        """W[b, idx[b]] for each sample, shape like x."""
        W = self.W
        return W.gather(1, bcast(idx[:, None], W).expand((W.shape[0], 1) + W.shape[2:]))[:, 0]

    def increment(self, h: torch.Tensor, active: torch.Tensor, fresh: torch.Tensor, bridge: torch.Tensor):
        """W over the next ``h`` (``[batch]``; 0 for inactive samples); ``fresh``, ``bridge``: N(0, I) like x."""
        U, V = self.U, self.valid
        inf = torch.full_like(U, math.inf)
        beyond = V & (U >= (h * (1 - self.rel))[:, None])
        Ub, ib = torch.where(beyond, U, inf).min(1)
        Ua, ia = torch.where(V & ~beyond, U, -inf).max(1)
        has_b, has_a = torch.isfinite(Ub), torch.isfinite(Ua)
        Ua = torch.where(has_a, Ua, 0.0)
        Wa = torch.where(bcast(has_a, fresh), self._at(ia), 0.0)
        Wb = self._at(ib)
        on_b = has_b & (Ub <= h * (1 + self.rel))
        inside = has_b & ~on_b
        Ub_safe = torch.where(inside, Ub, Ua + 1.0)
        frac = torch.where(inside, (h - Ua) / (Ub_safe - Ua), 0.0)
        var = torch.where(inside, (h - Ua) * (Ub_safe - h) / (Ub_safe - Ua), (h - Ua)).clamp(min=0)
        noise = torch.where(bcast(inside, fresh), bridge, fresh)
        dw = Wa + bcast(frac.to(fresh.dtype), fresh) * (Wb - Wa) + bcast(var.sqrt().to(fresh.dtype), fresh) * noise
        dw = torch.where(bcast(on_b, dw), Wb, dw)
        dw = torch.where(bcast(active, dw), dw, 0.0)
        # remember the new point in a free slot; when all are taken it is not remembered (so the far points,
        # which carry the large-scale path, are kept and the loss is confined inside the bracket (a, b))
        free = ~V
        new = active & ~on_b
        self.overflows = self.overflows + (new & ~free.any(1)).long()
        put = (self.k == free.long().argmax(1)[:, None]) & (new & free.any(1))[:, None]
        self.U = torch.where(put, h[:, None], U)
        self.valid = V | put
        self.W = torch.where(bcast(put, self.W), dw[:, None], self.W)
        self._dw = dw
        return dw

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The per-sample state (batch first), for an integrator that compacts its batch."""
        return self.U, self.valid, self.W, self.overflows

    def load(self, tensors: tuple[torch.Tensor, ...]) -> None:
        """Take the state back from `tensors` (possibly cut down to fewer rows)."""
        self.U, self.valid, self.W, self.overflows = tensors

    def advance(self, h: torch.Tensor, accepted: torch.Tensor, finished: torch.Tensor) -> None:
        """Move accepted samples forward by ``h`` (the step just tried); forget everything of finished ones."""
        assert self._dw is not None
        h = h.to(self.U.dtype)
        U = torch.where(accepted[:, None], self.U - h[:, None], self.U)
        self.valid = self.valid & ~finished[:, None] & (U > (h * self.rel)[:, None])
        self.U = U
        self.W = torch.where(bcast(accepted, self.W), self.W - self._dw[:, None], self.W)
