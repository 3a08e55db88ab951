"""Explicit Runge-Kutta methods as data: Butcher tableaux with Python-float coefficients.

Fixed-step methods (``EULER``, ``HEUN``, ``RK4``: no embedded pair) drive the grid solvers ``euler``, ``heun``,
``rk4``; embedded pairs (``DOPRI5``, ``DOPRI5_SHAMPINE``, ``TSIT5``, ``BOSH3``) drive the adaptive integrator
(`scoresolve.solvers.integrate`). One generic stepper serves each family; a method is only its tableau.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit embedded Runge-Kutta pair with ``s`` stages, as Python floats.

    Attributes:
        name: the method's name.
        order: order of the propagated solution (weights ``b``).
        embedded_order: order of the embedded solution (weights ``b_hat``) used only for the error estimate;
            None for a fixed-step method without one.
        a: strictly lower-triangular rows: ``a[i]`` holds the ``i + 1`` coefficients of stage ``i + 1``
            (stage 0 is the vector field at the start of the step), so there are ``s - 1`` rows.
        b: ``s`` weights of the solution.
        b_hat: ``s`` weights of the embedded solution (None without one); the local error estimate is
            h sum_j (b_j - b_hat_j) k_j.
        c: ``s`` nodes (stage times t + c_i h); c_i = sum_j a_ij for every method here.
        fsal: first same as last: the last stage is evaluated at the new solution (last row of ``a`` equals
            ``b``, ``c[-1] == 1``, ``b[-1] == 0``), so an accepted step hands its last stage to the next step.
    """

    name: str
    order: int
    embedded_order: int | None
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    b_hat: Tuple[float, ...] | None
    c: Tuple[float, ...]
    fsal: bool

    def __post_init__(self) -> None:
        s = len(self.b)
        if (self.b_hat is None) != (self.embedded_order is None):
            raise ValueError(f"tableau {self.name!r}: give both b_hat and embedded_order, or neither")
        if (self.b_hat is not None and len(self.b_hat) != s) or len(self.c) != s or len(self.a) != s - 1:
            raise ValueError(f"tableau {self.name!r}: need len(b) == len(b_hat) == len(c) == len(a) + 1")
        if any(len(row) != i + 1 for i, row in enumerate(self.a)):
            raise ValueError(f"tableau {self.name!r}: row i of a must have i + 1 entries")
        if self.c[0] != 0.0:
            raise ValueError(f"tableau {self.name!r}: c[0] must be 0 for an explicit method")
        if self.fsal and (tuple(self.a[-1]) != tuple(self.b[:-1]) or self.b[-1] != 0.0 or self.c[-1] != 1.0):
            raise ValueError(f"tableau {self.name!r}: FSAL needs a[-1] == b[:-1], b[-1] == 0 and c[-1] == 1")

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def adaptive(self) -> bool:
        """Whether the method has an embedded error estimate (and so can choose its own steps)."""
        return self.b_hat is not None

    @property
    def b_err(self) -> Tuple[float, ...]:
        """Error weights b - b_hat (the local error estimate is h sum_j b_err_j k_j)."""
        if self.b_hat is None:
            raise ValueError(f"tableau {self.name!r} has no embedded method")
        return tuple(bi - bh for bi, bh in zip(self.b, self.b_hat))


DOPRI5 = ButcherTableau(
    name="dopri5",
    order=5,
    embedded_order=4,
    a=(
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_hat=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    fsal=True,
)
"""Dormand-Prince 5(4) (Dormand & Prince 1980; Hairer, Norsett & Wanner I, Table II.5.2): 7 stages, FSAL
(6 evaluations per step), 5th-order solution (local extrapolation), 4th-order embedded method of the original
paper (as in Hairer's DOPRI5 and scipy's RK45; torchdiffeq uses Shampine's alternative embedded weights)."""

DOPRI5_SHAMPINE = ButcherTableau(
    name="dopri5_shampine",
    order=5,
    embedded_order=4,
    a=DOPRI5.a,
    b=DOPRI5.b,
    b_hat=(1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60),
    c=DOPRI5.c,
    fsal=True,
)
"""Dormand-Prince 5(4) with Shampine's alternative 4th-order embedded weights (Shampine 1986, "Some practical
Runge-Kutta formulas", Math. Comp. 46; torchdiffeq's ``dopri5``): the same stages and solution as `DOPRI5`, error
weights b - b_hat exactly 2/3 of its ones, i.e. `DOPRI5` at 1.5x rtol and atol (steps ~8% longer)."""

BOSH3 = ButcherTableau(
    name="bosh3",
    order=3,
    embedded_order=2,
    a=(
        (1 / 2,),
        (0.0, 3 / 4),
        (2 / 9, 1 / 3, 4 / 9),
    ),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_hat=(7 / 24, 1 / 4, 1 / 3, 1 / 8),
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    fsal=True,
)
"""Bogacki-Shampine 3(2) (Bogacki & Shampine 1989; MATLAB's ode23, scipy's RK23): 4 stages, FSAL (3 evaluations
per step), 3rd-order solution, 2nd-order embedded method."""

TSIT5 = ButcherTableau(
    name="tsit5",
    order=5,
    embedded_order=4,
    a=(
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383),
        (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774),
    ),
    b=(0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774, 0.0),
    # b_hat = b - (b - b_hat), with the error weights of Tsitouras (2011), Table 1 (last line).
    b_hat=(
        0.09646076681806523 - 0.00178001105222577714,
        0.01 - 0.0008164344596567469,
        0.4798896504144996 + 0.007880878010261995,
        1.379008574103742 - 0.1447110071732629,
        -3.290069515436081 + 0.5823571654525552,
        2.324710524099774 - 0.45808210592918697,
        1 / 66,
    ),
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    fsal=True,
)
"""Tsitouras 5(4) (Ch. Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying
assumption", Comput. Math. Appl. 62 (2011) 770-775): 7 stages, FSAL (6 evaluations per step), 5th-order solution,
4th-order embedded method; smaller error constants than Dopri5 at the same cost (the usual better default)."""

EULER = ButcherTableau(name="euler", order=1, embedded_order=None, a=(), b=(1.0,), b_hat=None, c=(0.0,), fsal=False)
"""Explicit Euler: 1 stage, order 1."""

HEUN = ButcherTableau(name="heun", order=2, embedded_order=None, a=((1.0,),), b=(0.5, 0.5), b_hat=None, c=(0.0, 1.0),
                      fsal=False)
"""Heun's method (explicit trapezoid; EDM's 2nd-order sampler without churn): 2 stages, order 2."""

RK4 = ButcherTableau(name="rk4", order=4, embedded_order=None, a=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                     b=(1 / 6, 1 / 3, 1 / 3, 1 / 6), b_hat=None, c=(0.0, 0.5, 0.5, 1.0), fsal=False)
"""The classical 4th-order Runge-Kutta method: 4 stages."""

TABLEAUX = {tab.name: tab for tab in (DOPRI5, DOPRI5_SHAMPINE, TSIT5, BOSH3)}
"""The embedded pairs by name (the ``method`` of the adaptive integrator)."""

FIXED_TABLEAUX = {tab.name: tab for tab in (EULER, HEUN, RK4)}
"""The fixed-step methods by name."""
