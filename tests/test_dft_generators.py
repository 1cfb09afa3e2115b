"""Structure generators of mlmd_lab.dft: counts, determinism, provenance, strain geometry, defects,
de-duplication and MD snapshots (mlmd_lab LennardJones and an ASE calculator)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from mlmd_lab.dft import (
    deduplicate,
    distance_fingerprint,
    fingerprint_distance,
    md_snapshots,
    rattle,
    strain_scan,
    substitutions,
    supercell,
    vacancies,
    volume_scan,
)
from mlmd_lab.errors import MLMDError
from mlmd_lab.frames import content_hash, labelled_atoms


def si8() -> Atoms:
    return bulk("Si", "diamond", a=5.43, cubic=True)


def check_provenance(structures, name, parent):
    for s in structures:
        gen = s.info["generator"]
        assert gen["name"] == name
        assert gen["parent"] == content_hash(parent)
        assert s.calc is None
        json.dumps(gen)  # JSON-serialisable, as the database and extxyz need


def test_rattle_counts_determinism_and_provenance():
    parent = si8()
    a = rattle(parent, 5, amplitude=0.05, seed=3)
    b = rattle(parent, 5, amplitude=0.05, seed=3)
    c = rattle(parent, 5, amplitude=0.05, seed=4)
    assert len(a) == 5
    check_provenance(a, "rattle", parent)
    assert [s.info["generator"]["parameters"]["index"] for s in a] == list(range(5))
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x.positions, y.positions)
        assert not np.allclose(x.positions, z.positions)
    disp = np.concatenate([s.positions - parent.positions for s in a])
    assert 0.04 < disp.std() < 0.06  # Gaussian of the given amplitude
    np.testing.assert_array_equal(parent.positions, si8().positions)  # the input is untouched
    # cell rattling changes the cell; chained generators keep the history
    d = rattle(a[0], 2, amplitude=0.0, seed=1, cell_amplitude=0.01)
    assert not np.allclose(d[0].cell.array, a[0].cell.array)
    assert d[0].info["generator"]["history"] == ["rattle"]
    assert d[0].info["generator"]["parent"] == content_hash(a[0])


def test_rattle_drops_database_metadata_and_labels():
    frame = labelled_atoms(["Ar"], [[0, 0, 0]], cell=np.eye(3) * 5, pbc=True, energy=-1.0, forces=[[0, 0, 0]],
                           info={"frame_id": "abc", "calc_id": "def", "signature": {"code": "qe"}, "step": 4})
    out = rattle(frame, 1)[0]
    assert out.calc is None
    assert not {"frame_id", "calc_id", "signature", "step"} & set(out.info)
    assert out.info["generator"]["parent"] == content_hash(frame)  # hash of the labelled parent


@pytest.mark.parametrize("kind,axis", [("volume", None), ("uniaxial", "y"), ("shear", "xz")])
def test_strain_scan_volumes(kind, axis):
    parent = si8()
    strains = [-0.04, -0.02, 0.0, 0.03]
    out = strain_scan(parent, strains=strains, kind=kind, axis=axis)
    assert len(out) == len(strains)
    check_provenance(out, "strain_scan", parent)
    v0 = parent.get_volume()
    for s, atoms in zip(strains, out, strict=True):
        expected = {"volume": v0 * (1 + s), "uniaxial": v0 * (1 + s), "shear": v0 * (1 - s * s / 4)}[kind]
        assert atoms.get_volume() == pytest.approx(expected, rel=1e-10)
        assert atoms.info["generator"]["parameters"]["strain"] == s
        # atoms move with the cell: the same fractional coordinates
        np.testing.assert_allclose(atoms.get_scaled_positions(wrap=False), parent.get_scaled_positions(wrap=False),
                                   atol=1e-12)
    if kind == "uniaxial":
        lengths = out[0].cell.lengths() / parent.cell.lengths()
        np.testing.assert_allclose(lengths, [1.0, 0.96, 1.0])
    if kind == "shear":
        F = np.asarray(out[-1].info["generator"]["parameters"]["deformation"])
        assert F[0, 2] == F[2, 0] == pytest.approx(0.015)


def test_volume_scan_and_errors():
    parent = si8()
    out = volume_scan(parent, n=5, max_change=0.1)
    assert [a.get_volume() / parent.get_volume() for a in out] == pytest.approx([0.9, 0.95, 1.0, 1.05, 1.1])
    check_provenance(out, "volume_scan", parent)
    absolute = volume_scan(parent, volumes=[150.0, 170.0])
    assert [a.get_volume() for a in absolute] == pytest.approx([150.0, 170.0])
    with pytest.raises(MLMDError, match="periodic 3-D cell"):
        volume_scan(molecule("H2O"))
    with pytest.raises(MLMDError, match="kind"):
        strain_scan(parent, kind="twist")
    with pytest.raises(MLMDError, match="axis"):
        strain_scan(parent, kind="shear", axis="xx")


def test_supercell_forms():
    parent = si8()
    (two,) = supercell(parent, 2)
    assert len(two) == 64 and two.get_volume() == pytest.approx(8 * parent.get_volume())
    assert two.info["generator"]["parameters"]["P"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    (slab,) = supercell(parent, (1, 1, 3))
    assert len(slab) == 24
    prim = bulk("Si", "diamond", a=5.43)
    (cubic,) = supercell(prim, [[-1, 1, 1], [1, -1, 1], [1, 1, -1]])
    assert len(cubic) == 8 and cubic.get_volume() == pytest.approx(parent.get_volume())
    check_provenance([two, slab], "supercell", parent)
    assert cubic.info["generator"]["parent"] == content_hash(prim)
    with pytest.raises(MLMDError, match="determinant"):
        supercell(parent, [[1, 0, 0], [1, 0, 0], [0, 0, 1]])


def test_vacancies_counts_and_sampling():
    parent = si8()
    one = vacancies(parent, "Si", n=1)
    assert len(one) == 8 and all(len(a) == 7 for a in one)
    assert sorted(a.info["generator"]["parameters"]["removed"][0] for a in one) == list(range(8))
    check_provenance(one, "vacancies", parent)
    pairs = vacancies(parent, n=2, max_structures=None)
    assert len(pairs) == math.comb(8, 2) and all(len(a) == 6 for a in pairs)
    sampled = vacancies(parent, n=2, max_structures=5, seed=1)
    again = vacancies(parent, n=2, max_structures=5, seed=1)
    assert len(sampled) == 5
    assert [a.info["generator"]["parameters"]["removed"] for a in sampled] == \
        [a.info["generator"]["parameters"]["removed"] for a in again]
    assert len({tuple(a.info["generator"]["parameters"]["removed"]) for a in sampled}) == 5
    water = molecule("H2O")
    h = vacancies(water, "H")
    assert len(h) == 2 and all(a.get_chemical_formula() == "HO" for a in h)
    with pytest.raises(MLMDError, match="has 0 Ge"):
        vacancies(parent, "Ge")


def test_substitutions():
    parent = si8()
    out = substitutions(parent, "Si", "Ge", n=2, max_structures=6, seed=2)
    assert len(out) == 6
    for a in out:
        assert a.get_chemical_formula() == "Ge2Si6"
        sites = a.info["generator"]["parameters"]["sites"]
        assert [a[i].symbol for i in sites] == ["Ge", "Ge"]
        np.testing.assert_array_equal(a.positions, parent.positions)
    check_provenance(out, "substitutions", parent)
    assert len(substitutions(parent, "Si", "C", n=1)) == 8
    with pytest.raises(MLMDError, match="unknown element"):
        substitutions(parent, "Si", "Xx")


def test_fingerprint_is_invariant():
    water = molecule("H2O")
    moved = water.copy()
    moved.rotate(37, "x", center="COM")
    moved.translate([1.0, -2.0, 0.5])
    moved = moved[[2, 0, 1]]  # permuted
    assert fingerprint_distance(distance_fingerprint(water), distance_fingerprint(moved)) < 1e-10
    fp = distance_fingerprint(si8(), cutoff=4.0)
    # Si8 cubic cell: 4 nearest neighbours (2.35 Å) and 12 second neighbours (3.84 Å) per atom, each pair once
    d = fp[("Si", "Si")]
    assert np.sum(d < 2.5) == 8 * 4 // 2 and np.sum((d > 3.7) & (d < 3.9)) == 8 * 12 // 2


def test_deduplicate_exact_near_and_symmetry_equivalent():
    parent = si8()
    rattled = rattle(parent, 4, amplitude=0.05, seed=0)
    near = rattled[1].copy()
    near.positions[0] += [0.001, 0.0, 0.0]  # 1 mÅ: a near-duplicate
    shifted = rattled[2].copy()
    shifted.positions += [0.3, 0.2, 0.1]  # a rigid translation: the same structure
    exact = rattled[3].copy()
    items = [*rattled, exact, near, shifted]
    kept, idx = deduplicate(items, tolerance=0.01, return_indices=True)
    assert idx == [0, 1, 2, 3]
    assert kept[0] is items[0]
    # exact only: the translated and the 1 mÅ copies are kept
    assert deduplicate(items, tolerance=0) == [*rattled, near, shifted]
    # the 8 single vacancies of cubic Si8 are symmetry-equivalent: one survives
    assert len(deduplicate(vacancies(parent, n=1))) == 1
    # different compositions or strains are never merged
    mixed = [*volume_scan(parent, n=3, max_change=0.05), *substitutions(parent, "Si", "Ge")]
    assert len(deduplicate(mixed)) == 3 + 1
    # labels do not matter for the near test, but they do for the exact one
    a = labelled_atoms(["Ar", "Ar"], [[0, 0, 0], [0, 0, 3.8]], energy=-1.0, forces=np.zeros((2, 3)))
    b = labelled_atoms(["Ar", "Ar"], [[0, 0, 0], [0, 0, 3.8]], energy=-2.0, forces=np.zeros((2, 3)))
    assert len(deduplicate([a, b], tolerance=0)) == 2
    assert len(deduplicate([a, b])) == 1


def test_md_snapshots_lennard_jones_argon():
    from mlmd_lab.md import LennardJones

    argon = bulk("Ar", "fcc", a=5.40, cubic=True).repeat(2)
    kw = {"temperatures": [30.0, 80.0], "steps": 40, "interval": 10, "timestep_fs": 5.0, "seed": 7}
    snaps = md_snapshots(argon, LennardJones(), **kw)
    assert len(snaps) == 2 * 4
    check_provenance(snaps, "md_snapshots", argon)
    params = [s.info["generator"]["parameters"] for s in snaps]
    assert [p["temperature_K"] for p in params] == [30.0] * 4 + [80.0] * 4
    assert [p["step"] for p in params] == [10, 20, 30, 40] * 2
    assert {p["engine"] for p in params} == {"mlmd_lab.md"}
    for s in snaps:
        assert len(s) == 32 and not np.allclose(s.positions, argon.positions)
        frac = s.get_scaled_positions(wrap=False)
        assert (frac >= -1e-9).all() and (frac < 1 + 1e-9).all()  # wrapped into the cell
        assert not ({"step", "time_fs", "temperature_K"} & set(s.info))  # MD metadata moved to the generator
    # hotter runs move atoms further
    disp = [np.abs(s.positions - argon.positions).mean() for s in snaps]
    assert np.mean(disp[4:]) > np.mean(disp[:4])
    again = md_snapshots(argon, LennardJones(), **kw)
    np.testing.assert_allclose(again[-1].positions, snaps[-1].positions)


def test_md_snapshots_ase_calculator():
    from ase.calculators.emt import EMT

    copper = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    snaps = md_snapshots(copper, EMT(), temperatures=[300.0, 600.0], steps=20, interval=5, timestep_fs=2.0,
                         seed=1, equilibration=5)
    assert len(snaps) == 2 * 3  # steps 10, 15, 20 of each run
    assert [s.info["generator"]["parameters"]["step"] for s in snaps] == [10, 15, 20] * 2
    assert snaps[0].info["generator"]["parameters"]["engine"] == "ase.Langevin"
    assert snaps[0].info["generator"]["parameters"]["potential"] == "EMT"
    again = md_snapshots(copper, EMT(), temperatures=[300.0, 600.0], steps=20, interval=5, timestep_fs=2.0,
                         seed=1, equilibration=5)
    for x, y in zip(snaps, again, strict=True):
        np.testing.assert_allclose(x.positions, y.positions)
    assert copper.calc is None  # the input is not modified
    with pytest.raises(MLMDError, match="steps >= 1"):
        md_snapshots(copper, EMT(), steps=0)
