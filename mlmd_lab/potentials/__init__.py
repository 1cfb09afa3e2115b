"""Behler–Parrinello neural-network potentials in JAX, exactly compatible with n2p2.

Main entry points: :class:`HDNNP` (``from_n2p2``, ``create``, ``to_n2p2``, ``predict``, ``calculator``),
:func:`generate_symmetry_functions` (a sound default symmetry-function set), :class:`SymmetryFunction`, and
:func:`evaluate` (energies, forces and virials of a neighbour graph in pure JAX, for engines such as the MD).
"""

from mlmd_lab import jaxconfig

jaxconfig.configure()  # float64 and the compilation cache, before anything is compiled

from mlmd_lab.potentials.model import HDNNP, ExtrapolationWarning, evaluate  # noqa: E402
from mlmd_lab.potentials.symfunc import SymmetryFunction  # noqa: E402

__all__ = ["HDNNP", "ExtrapolationWarning", "SymmetryFunction", "evaluate", "generate_symmetry_functions"]


def __getattr__(name):
    if name == "generate_symmetry_functions":
        from mlmd_lab.potentials.defaults import generate_symmetry_functions

        return generate_symmetry_functions
    raise AttributeError(name)
