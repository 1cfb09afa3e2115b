"""n2p2's cutoff functions f_c(r), written for JAX.

n2p2 numbers them in ``input.nn`` (``cutoff_type <n> [alpha]``); the inner cutoff r_ci = alpha * r_c keeps
f_c = 1 below it for the shiftable types (cos, exp, poly1-4). With x = (r - r_ci) / (r_c - r_ci):

====  ========  =========================================  =========
code  name      f                                          shiftable
====  ========  =========================================  =========
0     hard      1                                          no
1     cos       (cos(pi x) + 1) / 2                        yes
2     tanhu     tanh^3(1 - r/r_c)  (not normalised)        no
3     tanh      tanh^3(1 - r/r_c) / tanh^3(1)  (f(0) = 1)  no
4     exp       exp(1 - 1/(1 - x^2))                       yes
5     poly1     (2x - 3) x^2 + 1                           yes
6     poly2     ((15 - 6x) x - 10) x^3 + 1                 yes
7     poly3     (x (x (20x - 70) + 84) - 35) x^4 + 1       yes
8     poly4     (x (x ((315 - 70x) x - 540) + 420) - 126) x^5 + 1   yes
====  ========  =========================================  =========

All are zero for r >= r_c, as in n2p2. Lengths are in whatever unit r and r_c share.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from mlmd_lab.errors import MLMDError

CUTOFF_NAMES = {0: "hard", 1: "cos", 2: "tanhu", 3: "tanh", 4: "exp", 5: "poly1", 6: "poly2", 7: "poly3", 8: "poly4"}
CUTOFF_CODES = {name: code for code, name in CUTOFF_NAMES.items()}
SHIFTABLE = {1, 4, 5, 6, 7, 8}
_TANH_PRE = ((math.e + 1 / math.e) / (math.e - 1 / math.e)) ** 3  # 1 / tanh(1)^3, n2p2's constant


def cutoff_code(value: int | str) -> int:
    """The n2p2 code of a cutoff type given by code (``2``) or name (``"tanhu"``)."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        if value not in CUTOFF_CODES:
            raise MLMDError(f"unknown cutoff type {value!r}; use one of {sorted(CUTOFF_CODES)}")
        return CUTOFF_CODES[value]
    code = int(value)
    if code not in CUTOFF_NAMES:
        raise MLMDError(f"unknown n2p2 cutoff_type {code}; n2p2 defines 0-8 ({CUTOFF_NAMES})")
    return code


def _core(x, code: int):
    """f(x) on 0 <= x < 1 for the shiftable types."""
    if code == 1:
        return 0.5 * (jnp.cos(jnp.pi * x) + 1.0)
    if code == 4:
        # exp(1 - 1/(1-x^2)); x < 1 is guaranteed by the caller's mask, clip keeps masked lanes finite.
        xs = jnp.clip(x, 0.0, 1.0 - 1e-12)
        return jnp.exp(1.0 - 1.0 / (1.0 - xs * xs))
    if code == 5:
        return (2.0 * x - 3.0) * x * x + 1.0
    if code == 6:
        return ((15.0 - 6.0 * x) * x - 10.0) * x**3 + 1.0
    if code == 7:
        return (x * (x * (20.0 * x - 70.0) + 84.0) - 35.0) * x**4 + 1.0
    if code == 8:
        return (x * (x * ((315.0 - 70.0 * x) * x - 540.0) + 420.0) - 126.0) * x**5 + 1.0
    raise MLMDError(f"cutoff type {code} has no core function")


def cutoff(r, rc: float, code: int, alpha: float = 0.0):
    """f_c(r) for distances ``r`` (any shape) with cutoff radius ``rc`` (same length unit)."""
    if code == 0:
        value = jnp.ones_like(r)
    elif code == 2:
        value = jnp.tanh(1.0 - r / rc) ** 3
    elif code == 3:
        value = _TANH_PRE * jnp.tanh(1.0 - r / rc) ** 3
    else:
        rci = alpha * rc
        x = (r - rci) / (rc - rci)
        inner = r < rci
        value = jnp.where(inner, 1.0, _core(jnp.where(inner, 0.0, x), code))
    return jnp.where(r < rc, value, 0.0)
