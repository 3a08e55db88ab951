"""Explicit Runge-Kutta methods as data: Butcher tableaux with Python-float coefficients.

Fixed-step methods (``EULER``, ``HEUN``, ``RK4``: no embedded pair) drive the grid solvers ``euler``, ``heun``,
``rk4``; embedded pairs (``DOPRI5``, ``DOPRI5_SHAMPINE``, ``TSIT5``, ``BOSH3``; ``VERN6`` and ``VERN7`` for tight
tolerances) drive the adaptive integrator (`scoresolve.solvers.integrate`). One generic stepper serves each family;
a method is only its tableau.
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

# Verner's "most efficient" pairs (J. H. Verner, "Numerically optimal Runge-Kutta pairs with interpolants", Numer.
# Algorithms 53 (2010) 383-396; coefficients from Jim Verner's "Refuge for Runge-Kutta pairs",
# https://www.sfu.ca/~jverner/, files RKV65.IIIXb.Efficient.00000144617.081204 and RKV76.IIa.Efficient.00001675585.
# 081206, 40-digit floats rounded to double; Vern6 and Vern7 of Julia's OrdinaryDiffEq). The order conditions up to
# the stated orders are checked by tests/test_solvers_ode.py::test_tableau_order_conditions.
_VERN6_B = (
    0.03438957868357036009278820124728322386520, 0.0, 0.0, 0.2582624555633503404659558098586120858767,
    0.4209371189673537150642551514069801967032, 4.405396469669310170148836816197095664891,
    -176.4831190242986576151740942499002125029, 172.3641334014150730294022582711902413315,
)

VERN6 = ButcherTableau(
    name="vern6",
    order=6,
    embedded_order=5,
    a=(
        (0.06,),
        (0.01923996296296296296296296296296296296296, 0.07669337037037037037037037037037037037037),
        (0.035975, 0.0, 0.107925),
        (1.318683415233148260919747276431735612861, 0.0, -5.042058063628562225427761634715637693344,
         4.220674648395413964508014358283902080483),
        (-41.87259166432751461803757780644346812905, 0.0, 159.4325621631374917700365669070346830453,
         -122.1192135650100309202516203389242140663, 5.531743066200053768252631238332999150076),
        (-54.43015693531650433250642051294142461271, 0.0, 207.0672513650184644273657173866509835987,
         -158.6108137845899991828742424365058599469, 6.991816585950242321992597280791793907096,
         -0.01859723106220323397765171799549294623692),
        (-54.66374178728197680241215648050386959351, 0.0, 207.9528062553893734515824816699834244238,
         -159.2889574744995071508959805871426654216, 7.018743740796944434698170760964252490817,
         -0.01833878590504572306472782005141738268361, -0.0005119484997882099077875432497245168395840),
        _VERN6_B,
    ),
    b=_VERN6_B + (0.0,),
    b_hat=(
        0.04909967648382489730906854927971225836479, 0.0, 0.0, 0.2251112229516524153401395320539875329485,
        0.4694682253029562039431948525047387412553, 0.8065792249988867707634161808995217981443, 0.0,
        -0.6071194891777959797672951465256217122488, 0.05686113944047569241147603178766138153594,
    ),
    c=(0.0, 3 / 50, 1439 / 15000, 1439 / 10000, 4973 / 10000, 389 / 400, 1999 / 2000, 1.0, 1.0),
    fsal=True,
)
"""Verner's "most efficient" 6(5) pair (RKV65.IIIXb): 9 stages, FSAL (8 evaluations per step), 6th-order
solution, 5th-order embedded method; for tight tolerances (rtol ~1e-7 and below) in float64."""

VERN7 = ButcherTableau(
    name="vern7",
    order=7,
    embedded_order=6,
    a=(
        (0.005,),
        (-1.076790123456790123456790123456790123457, 1.185679012345679012345679012345679012346),
        (0.04083333333333333333333333333333333333333, 0.0, 0.1225),
        (0.6389139236255726780508121615993336109954, 0.0, -2.455672638223656809662640566430653894211,
         2.272258714598084131611828404831320283215),
        (-2.661577375018757131119259297861818119279, 0.0, 10.80451388645613769565396655365532838482,
         -8.353914657396199411968048547819291691541, 0.8204875949566569791420417341743839209619),
        (6.067741434696770992718360183877276714679, 0.0, -24.71127363591108579734203485290746001803,
         20.42751793078889394045773111748346612697, -1.906157978816647150624096784352757010879,
         1.006172249242068014790040335899474187268),
        (12.05467007625320299509109452892778311648, 0.0, -49.75478495046898932807257615331444758322,
         41.14288863860467663259698416710157354209, -4.461760149974004185641911603484815375051,
         2.042334822239174959821717077708608543738, -0.09834843665406107379530801693870224403537),
        (10.13814652288180787641845141981689030769, 0.0, -42.64113603171750214622846006736635730625,
         35.76384003992257007135021178023160054034, -4.348022840392907653340370296908245943710,
         2.009862268377035895441943593011827554771, 0.3487490460338272405953822853053145879140,
         -0.2714390051048312842371587140910297407572),
        (-45.03007203429867712435322405073769635151, 0.0, 187.3272437654588840752418206154201997384,
         -154.0288236935018690596728621034510402582, 18.56465306347536233859492332958439136765,
         -7.141809679295078854925420496823551192821, 1.308808578161378625114762706007696696508, 0.0, 0.0),
    ),
    b=(
        0.04715561848627222170431765108838175679569, 0.0, 0.0, 0.2575056429843415189596436101037687580986,
        0.2621665397741262047713863095764527711129, 0.1521609265673855740323133199165117535523,
        0.4939969170032484246907175893227876844296, -0.2943031171403250441557244744092703429139,
        0.08131747232495109999734599440136761892478, 0.0,
    ),
    b_hat=(
        0.04460860660634117628731817597479197781432, 0.0, 0.0, 0.2671640378571372680509102260943837899738,
        0.2201018300177293019979715776650753096323, 0.2188431703143156830983120833512893824578,
        0.2289871705411202883378173889763552365362, 0.0, 0.0, 0.02029518466335628222767054793810430358554,
    ),
    c=(0.0, 0.005, 0.1088888888888888888888888888888888888889, 0.1633333333333333333333333333333333333333, 0.4555,
       0.6095094489978381317087004421486024949638, 0.884, 0.925, 1.0, 1.0),
    fsal=False,
)
"""Verner's "most efficient" 7(6) pair (RKV76.IIa): 10 stages, not FSAL (10 evaluations per step; the 10th stage
serves only the embedded method), 7th-order solution, 6th-order embedded method; for very tight tolerances
(rtol ~1e-9 and below) in float64."""

EULER = ButcherTableau(name="euler", order=1, embedded_order=None, a=(), b=(1.0,), b_hat=None, c=(0.0,), fsal=False)
"""Explicit Euler: 1 stage, order 1."""

HEUN = ButcherTableau(name="heun", order=2, embedded_order=None, a=((1.0,),), b=(0.5, 0.5), b_hat=None, c=(0.0, 1.0),
                      fsal=False)
"""Heun's method (explicit trapezoid; EDM's 2nd-order sampler without churn): 2 stages, order 2."""

RK4 = ButcherTableau(name="rk4", order=4, embedded_order=None, a=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                     b=(1 / 6, 1 / 3, 1 / 3, 1 / 6), b_hat=None, c=(0.0, 0.5, 0.5, 1.0), fsal=False)
"""The classical 4th-order Runge-Kutta method: 4 stages."""

TABLEAUX = {tab.name: tab for tab in (DOPRI5, DOPRI5_SHAMPINE, TSIT5, BOSH3, VERN6, VERN7)}
"""The embedded pairs by name (the ``method`` of the adaptive integrator)."""

FIXED_TABLEAUX = {tab.name: tab for tab in (EULER, HEUN, RK4)}
"""The fixed-step methods by name."""
