"""One structure in nglview: atoms, the unit cell of periodic frames, and force arrows.

>>> from mlmd_lab.widgets import structure_view
>>> view = structure_view(frame)            # an nglview.NGLWidget; display it in a cell
>>> show_structure(view, other_frame)       # replace what the same widget shows (no new widget)

Force arrows start at each atom and point along its force F (eV/Å). They are drawn ``scale * F`` long, with
``scale = max_arrow / max_i |F_i|`` (Å per eV/Å), so the largest force is ``max_arrow`` (default 1.5 Å) long
whatever the magnitude; :func:`force_arrows` returns the scale used so a caption can state it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

from mlmd_lab.errors import MLMDError
from mlmd_lab.frames import results_of

#: DOM class of every structure view (test hook, CSS).
DOM_CLASS = "mlmd-structure"
#: Length of the arrow of the largest force (Å).
MAX_ARROW = 1.5
#: Arrow colour (RGB, 0-1) and shaft radius (Å).
ARROW_COLOUR = (0.85, 0.1, 0.1)
ARROW_RADIUS = 0.12
#: Forces below this fraction of the largest one get no arrow (a zero-length arrow draws nothing useful).
MIN_ARROW_FRACTION = 1e-3
#: nglview representations of the atoms and their NGL parameters: small balls and thin sticks leave the force
#: arrows visible inside a crystal.
REPRESENTATIONS = {"ball+stick": {"radiusSize": 0.12, "aspectRatio": 2.5},
                   "spacefill": {"radiusScale": 0.3},
                   "licorice": {"radiusSize": 0.1}}
#: Initial camera tilt (rad about x, then y) so a cubic cell does not look flat face-on.
TILT = (0.35, -0.45)


@dataclass
class ForceArrows:
    """Arrows for the forces of one frame.

    Attributes:
        starts: arrow tails = atom positions, shape (M, 3), Å.
        ends: arrow heads, shape (M, 3), Å: ``start + scale * F``.
        scale: drawn length per force (Å per eV/Å); 0.0 when there are no (non-zero) forces.
        max_force: the largest |F_i| (eV/Å).
    """

    starts: np.ndarray
    ends: np.ndarray
    scale: float
    max_force: float

    def __len__(self) -> int:
        return len(self.starts)


def force_arrows(atoms: Atoms, forces: np.ndarray | None = None, max_arrow: float = MAX_ARROW) -> ForceArrows:
    """Arrow tails and heads for the forces of ``atoms`` (its stored results unless ``forces`` is given).

    Args:
        atoms: the frame (positions in Å).
        forces: (N, 3) forces in eV/Å; None: the frame's stored forces (none stored: no arrows).
        max_arrow: drawn length of the largest force (Å).

    Returns:
        :class:`ForceArrows`; atoms whose force is below ``MIN_ARROW_FRACTION`` of the largest get none.
    """
    positions = np.asarray(atoms.positions, dtype=float)
    if forces is None:
        forces = results_of(atoms).get("forces")
    empty = _no_arrows()
    if forces is None or len(positions) == 0:
        return empty
    forces = np.asarray(forces, dtype=float)
    if forces.shape != positions.shape:
        raise MLMDError(f"forces have shape {forces.shape} but the structure has {len(positions)} atoms: give "
                        f"an (N, 3) array in eV/Å, N = {len(positions)}")
    norms = np.linalg.norm(forces, axis=1)
    largest = float(norms.max())
    if not np.isfinite(largest) or largest <= 0.0:
        return ForceArrows(empty.starts, empty.ends, 0.0, largest if np.isfinite(largest) else 0.0)
    scale = max_arrow / largest
    keep = norms >= MIN_ARROW_FRACTION * largest
    starts = positions[keep]
    return ForceArrows(starts, starts + scale * forces[keep], scale, largest)


def _no_arrows() -> ForceArrows:
    return ForceArrows(np.zeros((0, 3)), np.zeros((0, 3)), 0.0, 0.0)


def structure_view(atoms: Atoms | None = None, forces: bool = True, *, max_arrow: float = MAX_ARROW,
                   representation: str = "ball+stick", height: str = "400px", **kwargs: Any):
    """An nglview view of an ASE ``Atoms``: atoms, unit cell (periodic cells) and force arrows.

    Args:
        atoms: the structure (positions in Å); None: an empty view to fill later with :func:`show_structure`.
        forces: draw force arrows from the frame's stored forces (eV/Å); skipped when it has none.
        max_arrow: drawn length of the largest force (Å); every arrow is ``max_arrow / max|F|`` Å per eV/Å.
        representation: "ball+stick", "spacefill" or "licorice".
        height: CSS height of the view.
        **kwargs: passed to ``nglview.NGLWidget``.

    Returns:
        an ``nglview.NGLWidget`` with the DOM class ``mlmd-structure``; ``view.mlmd_force_scale`` is the arrow
        scale in Å per eV/Å (0.0 without arrows).
    """
    import nglview

    view = nglview.NGLWidget(**kwargs)
    view.add_class(DOM_CLASS)
    view.layout.width = "100%"
    view.layout.height = height
    view.mlmd_force_scale = 0.0
    view.control.spin([1, 0, 0], TILT[0])  # once per widget: later structures keep the user's orientation
    view.control.spin([0, 1, 0], TILT[1])
    if atoms is not None:
        show_structure(view, atoms, forces, max_arrow=max_arrow, representation=representation)
    return view


def show_structure(view, atoms: Atoms, forces: bool = True, *, max_arrow: float = MAX_ARROW,
                   representation: str = "ball+stick") -> ForceArrows:
    """Replace what ``view`` (an ``nglview.NGLWidget``) shows by ``atoms``, in the same widget.

    Every component of the view (earlier structure, arrows) is removed, then the structure is added with
    ``representation``, its unit cell when any direction is periodic, and force arrows as one shape component
    (``forces=True`` and the frame has forces). The camera is re-centred on the new structure.

    Returns:
        the :class:`ForceArrows` drawn (empty when none); ``view.mlmd_force_scale`` is set to its scale.
    """
    from nglview.adaptor import ASEStructure

    if representation not in REPRESENTATIONS:
        raise MLMDError(f"unknown representation {representation!r}: use one of {', '.join(REPRESENTATIONS)}")
    if not isinstance(atoms, Atoms):
        raise MLMDError(f"show_structure needs an ase.Atoms, not {type(atoms).__name__}")
    shown, rotation = pdb_frame(atoms)
    clear_view(view)
    component = view.add_structure(ASEStructure(shown), default_representation=False)
    component.add_representation(representation, **REPRESENTATIONS[representation])
    if shown.pbc.any():
        component.add_representation("unitcell")
    arrows = _no_arrows()
    if forces:
        stored = results_of(atoms).get("forces")
        arrows = force_arrows(shown, None if stored is None else np.asarray(stored) @ rotation.T, max_arrow)
    if len(arrows):
        colour = list(ARROW_COLOUR)
        shapes = [("arrow", a.tolist(), b.tolist(), colour, ARROW_RADIUS)
                  for a, b in zip(arrows.starts, arrows.ends, strict=True)]
        # One shape component for all arrows (Shape.add_arrow would add one component per arrow).
        view._add_shape(shapes, name="forces")
    view.mlmd_force_scale = arrows.scale
    view.center()
    return arrows


def pdb_frame(atoms: Atoms) -> tuple[Atoms, np.ndarray]:
    """The structure as nglview receives it, and the rotation R (3×3) of its Cartesian frame.

    nglview gets the atoms as PDB text, and ASE's PDB writer turns a periodic cell into the standard form
    (a along x, b in the xy plane), rotating the positions with it. Vectors drawn beside the structure (force
    arrows) must be rotated the same way: ``v_shown = v @ R.T``. Returns a copy with those rotated positions
    and cell (R is the identity for a non-periodic frame; a periodic flag without a full 3-D cell is dropped).
    """
    shown = atoms.copy()
    shown.calc = None
    if not shown.pbc.any():
        return shown, np.eye(3)
    if shown.cell.rank < 3:
        shown.pbc = False
        return shown, np.eye(3)
    cell, rotation = shown.cell.standard_form()
    shown.positions = shown.positions @ rotation.T
    shown.cell = cell
    return shown, rotation


def clear_view(view) -> None:
    """Remove every component (structures, shapes) from an ``nglview.NGLWidget``."""
    for component_id in list(view._ngl_component_ids):
        view.remove_component(component_id)
