"""Explicit Runge-Kutta methods as data: one :class:`ButcherTableau` per method.

The step loop (:mod:`tolgate.stepping`) is written once and reads everything it needs from the
tableau: the stages (``c``, ``a``), the propagated solution (``b``), the error estimate
(``b_error``), the controller's exponent (``embedded_order``) and the dense output (``dense``).

Conventions:

* Stage ``i`` is ``k_i = f(t + c_i h, y + h * sum_j a[i][j] k_j)``; ``a[i]`` has ``i`` entries.
* ``y1 = y0 + h * sum_i b_i k_i``. All methods here are FSAL (first same as last): the last stage
  is evaluated at ``(t + h, y1)`` (``c[-1] = 1``, ``a[-1] = b[:-1]``, ``b[-1] = 0``), so it is the
  first stage of the next step and a step costs ``stages - 1`` evaluations.
* ``b_error = b - b_hat`` where ``b_hat`` are the weights of the embedded lower-order solution; the
  local error estimate is ``h * sum_i b_error_i k_i``, of size ``O(h^(embedded_order + 1))``.
* Dense output: ``y(t0 + theta h) = y0 + h * sum_i k_i * sum_p dense[i][p] * theta^(p + 1)`` for
  ``theta`` in ``[0, 1]``; at ``theta = 1`` the row sums of ``dense`` equal ``b``.

The coefficients are those of scipy's ``RK45`` (Dormand-Prince 5(4) with Shampine's 4th-order
continuous extension) and ``RK23`` (Bogacki-Shampine 3(2) with cubic Hermite interpolation), so a
single sample solved here takes the same steps as scipy's solver; tsit5 is Tsitouras (2011) with
its 4th-order interpolant, error weights as corrected in OrdinaryDiffEq.jl (issue 1654).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit embedded Runge-Kutta pair with a dense-output polynomial.

    Attributes:
        name: method name as passed to ``solve_per_sample(method=...)``.
        c: stage times as fractions of the step, ``(stages,)``.
        a: strictly lower-triangular coupling; ``a[i]`` holds stage ``i``'s ``i`` weights.
        b: weights of the propagated solution, ``(stages,)``.
        b_error: ``b - b_hat``, weights of the local error estimate, ``(stages,)``.
        order: order of ``b``.
        embedded_order: order of ``b_hat``; the controller's exponent is ``1/(embedded_order+1)``.
        dense: ``(stages, degree)`` coefficients of ``theta, theta^2, ...`` per stage.
        dense_order: order of the interpolant (its local error is ``O(h^(dense_order+1))``).
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...]
    order: int
    embedded_order: int
    dense: tuple[tuple[float, ...], ...]
    dense_order: int

    def __post_init__(self) -> None:
        stages = len(self.c)
        if len(self.a) != stages or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"{self.name}: a must have {stages} rows, row i holding i weights")
        if len(self.b) != stages or len(self.b_error) != stages or len(self.dense) != stages:
            raise ValueError(f"{self.name}: b, b_error and dense need one entry per stage ({stages})")
        fsal = self.c[-1] == 1.0 and self.b[-1] == 0.0 and tuple(self.a[-1]) == tuple(self.b[:-1])
        if not fsal:
            raise ValueError(f"{self.name}: the step loop needs an FSAL tableau (last stage at (t+h, y1))")

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def b_hat(self) -> tuple[float, ...]:
        """Weights of the embedded lower-order solution."""
        return tuple(b - e for b, e in zip(self.b, self.b_error, strict=True))


def _hermite_dense(b: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """Cubic Hermite interpolation through ``(y0, f0)`` and ``(y1, f1)`` of an FSAL method.

    With ``y1 - y0 = h sum_i b_i k_i``, ``f0 = k_0`` and ``f1 = k_last``, the Hermite basis
    ``(3 theta^2 - 2 theta^3) (y1 - y0) + (theta - 2 theta^2 + theta^3) h f0 + (theta^3 - theta^2) h f1``
    is a per-stage polynomial in ``theta``.
    """
    last = len(b) - 1
    rows = []
    for i, weight in enumerate(b):
        row = [0.0, 3.0 * weight, -2.0 * weight]
        if i == 0:
            row = [row[0] + 1.0, row[1] - 2.0, row[2] + 1.0]
        if i == last:
            row = [row[0], row[1] - 1.0, row[2] + 1.0]
        rows.append(tuple(row))
    return tuple(rows)


def _expand_basis(factored: list[tuple[float, np.ndarray]]) -> tuple[tuple[float, ...], ...]:
    """Per-stage polynomials ``scale * poly(theta)`` (``poly`` highest power first, degree <= 4,
    no constant term) as rows of ``theta^1..theta^4`` coefficients."""
    rows = []
    for scale, poly in factored:
        coeffs = np.poly1d(poly).coeffs[::-1] * scale  # lowest power first
        padded = np.zeros(5)
        padded[: len(coeffs)] = coeffs
        rows.append(tuple(float(x) for x in padded[1:]))
    return tuple(rows)


def _tsit5_dense() -> tuple[tuple[float, ...], ...]:
    # Tsitouras (2011), interpolant basis b_i(theta); written as scale * polynomial products.
    p = np.polymul
    theta = [1.0, 0.0]
    theta2 = [1.0, 0.0, 0.0]
    return _expand_basis(
        [
            (
                -1.0530884977290216,
                p(p(theta, [1.0, -1.3299890189751412]), [1.0, -1.4364028541716351, 0.7139816917074209]),
            ),
            (0.1017, p(theta2, [1.0, -2.1966568338249754, 1.2949852507374631])),
            (2.490627285651252793, p(theta2, [1.0, -2.38535645472061657, 1.57803468208092486])),
            (-16.54810288924490272, p(p(theta2, [1.0, -1.21712927295533244]), [1.0, -0.61620406037800089])),
            (47.37952196281928122, p(p(theta2, [1.0, -1.203071208372362603]), [1.0, -0.658047292653547382])),
            (-34.87065786149660974, p(p(theta2, [1.0, -1.2]), [1.0, -0.666666666666666667])),
            (2.5, p(p(theta2, [1.0, -1.0]), [1.0, -0.6])),
        ]
    )


_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)

DOPRI5 = ButcherTableau(
    name="dopri5",
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        _DOPRI5_B[:-1],
    ),
    b=_DOPRI5_B,
    b_error=(71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40),
    order=5,
    embedded_order=4,
    dense_order=4,
    dense=(
        (1.0, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432),
        (0.0, 0.0, 0.0, 0.0),
        (0.0, 131558114200 / 32700410799, -68118460800 / 10900136933, 87487479700 / 32700410799),
        (0.0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072),
        (0.0, 127303824393 / 49829197408, -318862633887 / 49829197408, 701980252875 / 199316789632),
        (0.0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844),
        (0.0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423),
    ),
)

_BOSH3_B = (2 / 9, 1 / 3, 4 / 9, 0.0)

BOSH3 = ButcherTableau(
    name="bosh3",
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((), (1 / 2,), (0.0, 3 / 4), _BOSH3_B[:-1]),
    b=_BOSH3_B,
    b_error=(-5 / 72, 1 / 12, 1 / 9, -1 / 8),
    order=3,
    embedded_order=2,
    dense=_hermite_dense(_BOSH3_B),
    dense_order=3,
)

_TSIT5_B = (
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
    0.0,
)

TSIT5 = ButcherTableau(
    name="tsit5",
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.02826905039406838),
        _TSIT5_B[:-1],
    ),
    b=_TSIT5_B,
    b_error=(
        0.00178001105222577714,
        0.0008164344596567469,
        -0.007880878010261995,
        0.1447110071732629,
        -0.5823571654525552,
        0.45808210592918697,
        -1 / 66,
    ),
    order=5,
    embedded_order=4,
    dense=_tsit5_dense(),
    dense_order=4,
)

TABLEAUX: dict[str, ButcherTableau] = {t.name: t for t in (DOPRI5, BOSH3, TSIT5)}


def get_tableau(method: str) -> ButcherTableau:
    """The tableau registered under ``method``; ``ValueError`` naming the choices otherwise."""
    try:
        return TABLEAUX[method]
    except KeyError:
        raise ValueError(f"method must be one of {sorted(TABLEAUX)}, got {method!r}") from None
