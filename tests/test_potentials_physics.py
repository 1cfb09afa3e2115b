"""Physics of the HDNNP: symmetry functions against a direct implementation, forces = -grad E, stress =
strain derivative, invariances, small periodic cells, molecules, float32, batching, ASE integration."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.neighborlist import neighbor_list

from mlmd_lab.errors import MLMDError
from mlmd_lab.potentials import HDNNP, SymmetryFunction
from mlmd_lab.potentials.cutoff import CUTOFF_NAMES

# Most structures here lie outside fitted ranges on purpose; the extrapolation test checks the warning itself.
pytestmark = pytest.mark.filterwarnings("ignore::mlmd_lab.potentials.ExtrapolationWarning")


def _functions(rc=4.0):
    """A mixed set for elements Zn (30) and O: every type, shifted radial and angular, non-integer zeta."""
    sfs = []
    for c in ("O", "Zn"):
        for e in ("O", "Zn"):
            sfs += [SymmetryFunction(c, 2, (e,), eta=0.5, rc=rc), SymmetryFunction(c, 2, (e,), eta=2.0, rc=rc, rs=2.0)]
        for pair in (("O", "O"), ("O", "Zn"), ("Zn", "Zn")):
            sfs += [
                SymmetryFunction(c, 3, pair, eta=0.1, rc=rc, lam=1.0, zeta=1.0),
                SymmetryFunction(c, 3, pair, eta=0.2, rc=rc - 0.5, lam=-1.0, zeta=2.5, rs=0.3),
                SymmetryFunction(c, 9, pair, eta=0.05, rc=rc, lam=-1.0, zeta=4.0),
                SymmetryFunction(c, 9, pair, eta=0.3, rc=rc - 1.0, lam=1.0, zeta=1.5, rs=0.5),
            ]
    return sfs


def _model(cutoff_type="poly2", alpha=0.0, scaling="scalesigma", seed=1, rc=4.0):
    model = HDNNP.create(["Zn", "O"], _functions(rc), hidden=(6, 5), activations="tpl", cutoff_type=cutoff_type,
                         cutoff_alpha=alpha, scaling=scaling, seed=seed, atom_energy={"O": -2.0, "Zn": -1.0})
    rng = np.random.default_rng(seed)
    for element in model.elements:
        W, b = model.networks[element][-1]
        model.networks[element][-1] = (rng.normal(0, 0.5, W.shape), rng.normal(0, 0.1, b.shape))
    return model


def _zno(rattle=0.15, seed=0):
    atoms = bulk("ZnO", "wurtzite", a=3.25, c=5.2).repeat((2, 2, 1))
    atoms.rattle(rattle, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def model():
    m = _model()
    m.fit_scaling([_zno(seed=1), _zno(seed=2)])
    return m


# --------------------------------------------------------------------------- direct reference implementation
def _cutoff(r, rc, code, alpha):
    if r >= rc:
        return 0.0
    if code == 2:
        return np.tanh(1 - r / rc) ** 3
    if code == 3:
        return np.tanh(1 - r / rc) ** 3 / np.tanh(1.0) ** 3
    if code == 0:
        return 1.0
    rci = alpha * rc
    if r < rci:
        return 1.0
    x = (r - rci) / (rc - rci)
    return {
        1: 0.5 * (np.cos(np.pi * x) + 1),
        4: np.exp(1 - 1 / (1 - x * x)),
        5: (2 * x - 3) * x * x + 1,
        6: ((15 - 6 * x) * x - 10) * x**3 + 1,
        7: (x * (x * (20 * x - 70) + 84) - 35) * x**4 + 1,
        8: (x * (x * ((315 - 70 * x) * x - 540) + 420) - 126) * x**5 + 1,
    }[code]


def _reference_features(model, atoms):
    """Symmetry functions by the textbook double/triple sums over ASE's neighbour list."""
    code, alpha = model.settings.cutoff_type, model.settings.cutoff_alpha
    i_list, j_list, D = neighbor_list("ijD", atoms, model.plan.max_cutoff)
    symbols = atoms.get_chemical_symbols()
    out = []
    for i, sym in enumerate(symbols):
        sel = i_list == i
        js, vecs = j_list[sel], D[sel]
        g = []
        for sf in model.functions[sym]:
            fc = lambda r, sf=sf: _cutoff(r, sf.rc, code, alpha)  # noqa: E731
            if not sf.is_angular:
                g.append(sum(np.exp(-sf.eta * (np.linalg.norm(v) - sf.rs) ** 2) * fc(np.linalg.norm(v))
                             for j, v in zip(js, vecs, strict=True) if symbols[j] == sf.neighbours[0]))
                continue
            total = 0.0
            for a in range(len(js)):
                for b in range(a + 1, len(js)):
                    if sorted((symbols[js[a]], symbols[js[b]])) != sorted(sf.neighbours):
                        continue
                    rij, rik = np.linalg.norm(vecs[a]), np.linalg.norm(vecs[b])
                    rjk = np.linalg.norm(vecs[b] - vecs[a])
                    cos = vecs[a] @ vecs[b] / (rij * rik)
                    term = max(1 + sf.lam * cos, 0.0) ** sf.zeta * fc(rij) * fc(rik)
                    s = (rij - sf.rs) ** 2 + (rik - sf.rs) ** 2
                    if sf.type == 3:
                        term *= fc(rjk)
                        s += (rjk - sf.rs) ** 2
                    total += 2 ** (1 - sf.zeta) * term * np.exp(-sf.eta * s)
            g.append(total)
        out.append(np.array(g))
    return out


@pytest.mark.parametrize("cutoff_type,alpha", [(code, 0.3 if code in (1, 4, 5, 6, 7, 8) else 0.0)
                                               for code in sorted(CUTOFF_NAMES)])
def test_symmetry_functions_match_direct_sums(cutoff_type, alpha):
    model = _model(cutoff_type=cutoff_type, alpha=alpha)
    atoms = _zno()
    features = model.raw_features([atoms])
    reference = _reference_features(model, atoms)
    for element in model.elements:
        expected = np.array([g for g, s in zip(reference, atoms.get_chemical_symbols(), strict=True) if s == element])
        np.testing.assert_allclose(features[element], expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("scaling", ["none", "scale", "center", "scalecenter", "scalesigma"])
def test_scaling_types_follow_n2p2(scaling):
    model = _model(scaling=scaling)
    model.fit_scaling([_zno(seed=4)])
    atoms = _zno(seed=5)
    G = model.raw_features([atoms])["O"]
    gmin, gmax, gmean, gsigma = model.scaling_stats["O"].T
    smin, smax = model.settings.scale_min, model.settings.scale_max
    expected = {
        "none": G,
        "scale": smin + (smax - smin) * (G - gmin) / (gmax - gmin),
        "center": G - gmean,
        "scalecenter": smin + (smax - smin) * (G - gmean) / (gmax - gmin),
        "scalesigma": smin + (smax - smin) * (G - gmean) / gsigma,
    }[scaling]
    params = model.parameters()
    scaled = smin + np.asarray(params["factor"]["O"]) * (G - np.asarray(params["shift"]["O"]))
    np.testing.assert_allclose(scaled, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- derivatives
def test_forces_are_minus_energy_gradient(model):
    atoms = _zno(seed=3)
    atoms.calc = model.calculator(skin=0.0)
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 0.05  # a test that could fail
    numerical = calculate_numerical_forces(atoms, 1e-5)
    np.testing.assert_allclose(forces, numerical, atol=1e-7 * max(1.0, np.abs(forces).max()))


def test_stress_is_strain_derivative(model):
    atoms = _zno(seed=3)
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.03, 0.0], [0.0, 1.0, 0.02], [0.01, 0.0, 1.0]]),
                   scale_atoms=True)  # triclinic
    atoms.calc = model.calculator(skin=0.0)
    stress = atoms.get_stress()
    assert np.abs(stress).max() > 1e-3
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, 1e-6), atol=1e-8)


def test_per_atom_energies_sum_to_total(model):
    atoms = _zno(seed=6)
    result = model.predict(atoms)
    assert result["energies"].sum() == pytest.approx(result["energy"], rel=1e-13)


# --------------------------------------------------------------------------- invariances
def test_translation_rotation_and_permutation(model):
    atoms = _zno(seed=7)
    reference = model.predict(atoms)
    moved = atoms.copy()
    moved.translate([0.37, -1.2, 2.9])
    moved.wrap()
    rotated = atoms.copy()
    rotated.rotate(37, (1, 2, 3), rotate_cell=True)
    permutation = np.random.default_rng(0).permutation(len(atoms))
    shuffled = atoms[permutation]
    for other in (moved, rotated, shuffled):
        assert model.predict(other)["energy"] == pytest.approx(reference["energy"], rel=1e-12)
    R = rotated.get_cell().array.T @ np.linalg.inv(atoms.get_cell().array.T)
    np.testing.assert_allclose(model.predict(rotated)["forces"], reference["forces"] @ R.T, atol=1e-10)
    np.testing.assert_allclose(model.predict(shuffled)["forces"], reference["forces"][permutation], atol=1e-10)


def test_choice_of_periodic_image_and_cell(model):
    atoms = _zno(seed=8)
    energy = model.predict(atoms)["energy"]
    # Atoms moved by lattice vectors, and an equivalent cell (b -> b + a, c -> c - b).
    shifted = atoms.copy()
    shifted.positions[::3] += atoms.cell[0] - 2 * atoms.cell[2]
    sheared = atoms.copy()
    new_cell = atoms.cell.array.copy()
    new_cell[1] += new_cell[0]
    new_cell[2] -= new_cell[1]
    sheared.set_cell(new_cell, scale_atoms=False)
    sheared.wrap()
    supercell = atoms.repeat((2, 1, 1))
    assert model.predict(shifted)["energy"] == pytest.approx(energy, rel=1e-12)
    assert model.predict(sheared)["energy"] == pytest.approx(energy, rel=1e-12)
    assert model.predict(supercell)["energy"] == pytest.approx(2 * energy, rel=1e-12)


def test_cell_smaller_than_cutoff_uses_many_images():
    model = _model(rc=7.0)
    small = bulk("ZnO", "rocksalt", a=4.3)  # 2 atoms, cell far below the 7 Å cutoff
    small.rattle(0.05, seed=1)
    model.fit_scaling([small])
    big = small.repeat((3, 3, 3))
    e_small = model.predict(small)["energy"]
    assert model.predict(big)["energy"] == pytest.approx(27 * e_small, rel=1e-11)
    small.calc = model.calculator(skin=0.0)
    np.testing.assert_allclose(small.get_forces(), calculate_numerical_forces(small, 1e-5), atol=1e-7)


def test_molecule_without_cell():
    model = _model()
    zn_o = Atoms("ZnO3", positions=[[0, 0, 0], [1.9, 0, 0], [-0.5, 1.8, 0.2], [0.3, -0.4, 1.9]])
    model.fit_scaling([zn_o])
    zn_o.calc = model.calculator(skin=0.0)
    forces = zn_o.get_forces()
    np.testing.assert_allclose(forces, calculate_numerical_forces(zn_o, 1e-5), atol=1e-7)
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-10)  # momentum conservation
    assert "stress" not in zn_o.calc.results


def test_slab_periodic_in_two_directions(model):
    slab = _zno(seed=14)
    slab.pbc = (True, True, False)
    slab.center(vacuum=4.0, axis=2)
    slab.calc = model.calculator(skin=0.0)
    np.testing.assert_allclose(slab.get_forces(), calculate_numerical_forces(slab, 1e-5), atol=1e-7)
    assert "stress" not in slab.calc.results  # no stress without a 3D cell


def test_isolated_atom_has_offset_energy():
    model = _model()
    result = model.predict(Atoms("O", positions=[[0, 0, 0]]))
    np.testing.assert_allclose(result["forces"], 0.0)
    assert np.isfinite(result["energy"])


# --------------------------------------------------------------------------- precision, batching, ASE
def test_float32_is_close_to_float64(model):
    atoms = _zno(seed=9)
    r64 = model.predict(atoms)
    r32 = model.with_dtype("float32").predict(atoms)
    assert r32["energy"] == pytest.approx(r64["energy"], rel=1e-5)
    np.testing.assert_allclose(r32["forces"], r64["forces"], atol=1e-3 * np.abs(r64["forces"]).max())
    with pytest.raises(MLMDError, match="float64"):
        model.with_dtype("float16")


def test_batch_equals_single_structures(model):
    structures = [_zno(seed=10), bulk("ZnO", "rocksalt", a=4.3) * (2, 2, 2), _zno(seed=11)[:-3]]
    batch = model.predict(structures)
    for atoms, result in zip(structures, batch, strict=True):
        single = model.predict(atoms)
        assert result["energy"] == pytest.approx(single["energy"], rel=1e-13)
        np.testing.assert_allclose(result["forces"], single["forces"], atol=1e-12)


def test_predict_gives_one_result_for_one_structure_and_a_list_for_a_list(model):
    from mlmd_lab.train.ensemble import Ensemble

    atoms = _zno(seed=14)
    for potential in (model, Ensemble([model, model])):
        one = potential.predict(atoms)
        assert isinstance(one, dict) and one["forces"].shape == (len(atoms), 3)
        listed = potential.predict([atoms])
        assert isinstance(listed, list) and len(listed) == 1
        assert listed[0]["energy"] == one["energy"]
        both = potential.predict((atoms, atoms[:-2]))
        assert [len(r["forces"]) for r in both] == [len(atoms), len(atoms) - 2]


def test_calculator_reuses_neighbours_and_matches_rebuild(model):
    atoms = _zno(seed=12)
    atoms.calc = model.calculator(skin=1.0)
    atoms.get_potential_energy()
    rebuilds = atoms.calc.rebuilds
    rng = np.random.default_rng(0)
    for _ in range(3):
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        fresh = model.predict(atoms)
        assert energy == pytest.approx(fresh["energy"], rel=1e-13)
        np.testing.assert_allclose(forces, fresh["forces"], atol=1e-12)
    assert atoms.calc.rebuilds == rebuilds  # moved < skin / 2: lists reused
    atoms.positions[0] += 0.8
    atoms.get_potential_energy()
    assert atoms.calc.rebuilds == rebuilds + 1


def test_calculator_keeps_neighbours_under_a_small_cell_change(model):
    """The calculator uses the MD engine's reuse rule (skin_holds): a slightly strained cell keeps the lists
    (results as from a fresh build), a strong compression rebuilds them."""
    atoms = _zno(seed=16)
    atoms.calc = model.calculator(skin=1.0)
    atoms.get_potential_energy()
    rebuilds = atoms.calc.rebuilds
    atoms.set_cell(atoms.cell.array @ np.diag([1.004, 0.997, 1.002]), scale_atoms=True)
    energy, stress = atoms.get_potential_energy(), atoms.get_stress()
    assert atoms.calc.rebuilds == rebuilds
    fresh = model.predict(atoms)
    assert energy == pytest.approx(fresh["energy"], rel=1e-13)
    np.testing.assert_allclose(stress, fresh["stress"], atol=1e-12)
    atoms.set_cell(atoms.cell * 0.78, scale_atoms=True)  # (rc + skin) * 0.78 = 3.9 A < rc = 4 A: must rebuild
    atoms.get_potential_energy()
    assert atoms.calc.rebuilds == rebuilds + 1


def test_graph_capacities_are_powers_of_two_when_small_and_fine_when_large():
    """Evaluation graphs round small counts to powers of two (rattled copies of a cell share one compilation) and
    large ones in steps of at most 1/8; every capacity keeps a padding slot."""
    from mlmd_lab.potentials.neighbours import SMALL_CAPACITY, bucket, graph_capacity

    for count in [0, 1, 7, 8, 100, 127, 128, 1000, SMALL_CAPACITY - 1, SMALL_CAPACITY, 10_000, 123_457]:
        cap = graph_capacity(count)
        assert cap > count
        if count < SMALL_CAPACITY:
            assert cap & (cap - 1) == 0 and cap < 2 * max(count + 1, 8)
        else:
            assert cap == bucket(count) <= count + 1 + count / 8
    model = _model()
    rattled = [_zno(seed=seed) for seed in range(20, 30)]  # one cell, ten rattles: 4 layouts to compile, not 6
    md = model.neighbour_builder()  # MD graphs keep the steps of 1/8
    evaluation = {model.graph([atoms]).layout for atoms in rattled}
    assert len(evaluation) < len({md.build_one(*model.structure(atoms)).layout for atoms in rattled})


def test_skin_rule_is_one_function_for_numpy_and_jax():
    import jax.numpy as jnp

    from mlmd_lab.md.forcefield import forcefield, neighbours_valid
    from mlmd_lab.potentials.neighbours import skin_holds

    rng = np.random.default_rng(3)
    R0, h0 = rng.uniform(0, 8, (20, 3)), np.diag([8.0, 8.5, 9.0])
    ff = forcefield(_model(), skin=0.6)
    for shift, strain, variable in [(0.2, 1.0, False), (0.31, 1.0, False), (0.1, 0.99, True), (0.1, 0.9, True)]:
        R = R0 + shift * np.eye(3)[0]
        h = h0 * strain
        host = bool(skin_holds(R, h, R0, h0, ff.cutoff, ff.skin, variable))
        assert host == bool(neighbours_valid(ff, jnp.asarray(R), jnp.asarray(h), jnp.asarray(R0), jnp.asarray(h0),
                                             variable))
        assert host == {(0.2, False): True, (0.31, False): False, (0.1, True): strain > 0.95}[(shift, variable)]


def test_ase_optimiser_lowers_energy(model):
    from ase.optimize import BFGS

    atoms = _zno(seed=13)
    atoms.calc = model.calculator()
    before = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=20)
    assert atoms.get_potential_energy() < before


def test_extrapolation_is_flagged():
    model = _model()
    model.fit_scaling([_zno(rattle=0.02, seed=1)])
    squeezed = _zno(rattle=0.02, seed=1)
    squeezed.set_cell(squeezed.cell * 0.8, scale_atoms=True)
    with pytest.warns(UserWarning, match="outside the training range"):
        result = model.predict(squeezed)
    assert (result["extrapolation"] > 0).all()
    assert (model.predict(_zno(rattle=0.0, seed=1), warn=False)["extrapolation"] >= 0).all()


# --------------------------------------------------------------------------- metals: r_lower and scaling floor
def _metal(symbol, a, n=2):
    frames = []
    for seed in range(n):
        atoms = bulk(symbol, "fcc", a=a, cubic=True)
        atoms.rattle(0.05, seed=seed)
        frames.append(atoms)
    return frames


def test_metal_with_default_functions_is_finite_in_float32():
    """Default functions (r_lower 0.8 Å) in fcc Pb: the innermost Gaussians are ~1e-58 with a spread to match;
    1/spread overflowed float32 and inf x 0 gave NaN. Such functions now count as constant (factor 0)."""
    frames = _metal("Pb", 4.95)
    model = HDNNP.create(["Pb"], hidden=(4,), activations="tl")
    model.fit_scaling(frames)
    stats = model.scaling_stats["Pb"]
    assert stats[:, 3].min() < 1e-40  # the case: a spread far below float32's range
    W, b = model.networks["Pb"][-1]
    model.networks["Pb"][-1] = (np.random.default_rng(0).normal(0, 0.5, W.shape), b)
    r64 = model.predict(frames, warn=False)
    r32 = model.with_dtype("float32").predict(frames, warn=False)
    for a, b in zip(r64, r32, strict=True):
        assert np.isfinite(b["energy"]) and np.isfinite(b["forces"]).all() and np.isfinite(b["stress"]).all()
        # Loose: functions of value ~1e-9 with a spread ~1e-10 are legal and scaled by ~1e10, which magnifies
        # float32's rounding of exp(-50) (measured: 1e-3 relative in the energy).
        assert b["energy"] == pytest.approx(a["energy"], rel=1e-2, abs=1e-3)
        np.testing.assert_allclose(b["forces"], a["forces"], atol=1e-2 * max(1.0, np.abs(a["forces"]).max()))


def test_create_takes_r_lower_from_frames():
    from mlmd_lab.potentials.defaults import r_lower_from

    frames = _metal("Cu", 3.61)
    shortest = min(np.min(a.get_all_distances(mic=True)[np.triu_indices(len(a), 1)]) for a in frames)
    assert r_lower_from(frames) == pytest.approx(0.9 * shortest, rel=1e-12)
    model = HDNNP.create(["Cu"], frames=frames)
    radial = [sf for sf in model.functions["Cu"] if sf.type == 2]
    assert min(sf.rs for sf in radial) == pytest.approx(0.9 * shortest, rel=1e-12)  # not 0.8 Å
    given = HDNNP.create(["Cu"], r_lower=1.5)
    assert min(sf.rs for sf in given.functions["Cu"] if sf.type == 2) == pytest.approx(1.5)
    default = HDNNP.create(["Cu"])
    assert min(sf.rs for sf in default.functions["Cu"] if sf.type == 2) == pytest.approx(0.8)
    with pytest.raises(MLMDError, match="explicit"):
        HDNNP.create(["Zn", "O"], _functions(), frames=frames)


def test_public_evaluate_is_what_evaluate_graph_runs(model):
    from mlmd_lab.potentials import evaluate

    atoms = _zno(seed=15)
    graph = model.graph([atoms])
    out = evaluate(model.energy_function(), model.padding_distance, model.parameters(), graph.arrays(),
                   graph.layout, True)
    expected = model.evaluate_graph(graph)
    n = len(atoms)
    assert out["forces"].shape == (graph.layout.n_atoms, 3) and out["virial"].shape == (1, 3, 3)
    np.testing.assert_allclose(np.asarray(out["energy"]), expected["energy"], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(out["forces"])[:n], expected["forces"][:n], atol=1e-12)
    np.testing.assert_allclose(np.asarray(out["virial"]), expected["virial"], atol=1e-12)


# --------------------------------------------------------------------------- the chunked descriptor kernel
def _evaluate_afresh(model, atoms_list):
    """Energies, forces and virials through a newly traced evaluate (so monkeypatched kernel settings apply)."""
    import jax

    from mlmd_lab.potentials.model import evaluate

    graph = model.graph(atoms_list)
    function = jax.jit(lambda params, arrays: evaluate(model.energy_function(), model.padding_distance, params,
                                                       arrays, graph.layout, True))
    out = function(model.parameters(), graph.arrays())
    return {k: np.asarray(out[k]) for k in ("energy", "forces", "virial")}


def test_chunk_loops_and_overlapping_last_chunks_give_the_one_piece_result(model, monkeypatch):
    """Blocks split into chunks of 64 (forward and backward loops) give what one chunk per block gives, to
    rounding. The graph gets one padding slot per block (not a power of two), so a block's last chunk, which
    overlaps the one before it (see descriptors._chunks), repeats up to 63 real pairs or triplets: counting them
    twice fails here."""
    from mlmd_lab.potentials import descriptors, neighbours

    structures = [_zno(seed=21), _zno(rattle=0.3, seed=22)]
    monkeypatch.setattr(neighbours, "graph_capacity", lambda count: max(int(count) + 1, 8))
    layout = model.graph(structures).layout
    caps = [cap for _, cap in layout.pair_blocks] + [cap for *_, cap in layout.triplet_groups]
    assert all(cap > 64 and cap % 64 > 0 for cap in caps), caps
    for name in ("CHUNK", "GRADIENT_CHUNK"):  # the forward and the backward loops
        monkeypatch.setattr(descriptors, name, 1 << 20)
    whole = _evaluate_afresh(model, structures)
    for name in ("CHUNK", "GRADIENT_CHUNK"):
        monkeypatch.setattr(descriptors, name, 64)
    chunked = _evaluate_afresh(model, structures)
    for key in whole:
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-12, atol=1e-12 * np.abs(whole[key]).max())
    assert np.abs(whole["forces"]).max() > 0.1  # a real test: non-trivial forces


_SHARDS_PROGRAM = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
import jax
from mlmd_lab.potentials import descriptors
from test_potentials_physics import _model, _zno, _evaluate_afresh
assert jax.local_device_count("cpu") == 3, jax.devices()
model = _model()
model.fit_scaling([_zno(seed=1), _zno(seed=2)])
descriptors.CHUNK, descriptors.GRADIENT_CHUNK, descriptors.MIN_CHUNKS_PER_DEVICE = 8, 8, 1
structures = [_zno(seed=31), _zno(rattle=0.3, seed=32)]
assert descriptors.cpu_shards(model.graph(structures).layout) == 3
split = _evaluate_afresh(model, structures)
from mlmd_lab.md.forcefield import forcefield
ff = forcefield(model, skin=0.3)
atoms = _zno(seed=33)
arrays, layout = ff.build(atoms.positions, atoms.cell.array, atoms.pbc, ff.species(atoms))
host = {{k: v.ctypes.data for k, v in arrays.items()}}
placed = ff.to_device(arrays, layout)
big = [k for k in ("pair_i", "trip_ij", "trip_ik")]
pointers = {{k: {{s.data.unsafe_buffer_pointer() for s in placed[k].addressable_shards}} for k in big}}
print("shared", all(len(placed[k].addressable_shards) == 3 and pointers[k] == {{host[k]}} for k in big))
descriptors.cpu_shards = lambda layout=None: 1
serial = _evaluate_afresh(model, structures)
for key in split:
    scale = np.abs(serial[key]).max()
    print(key, float(np.abs(split[key] - serial[key]).max() / scale), scale)
"""


def test_loops_split_over_cpu_devices_give_the_serial_result():
    """With three JAX CPU devices (MLMD_CPU_DEVICES=3, an uneven split) the loops run on all three and sum to the
    one-device result; the MD engine's neighbour arrays are one host buffer read by all three devices."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "MLMD_CPU_DEVICES": "3", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    program = _SHARDS_PROGRAM.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shared True" in out.stdout, "MD arrays were copied to each CPU device instead of shared"
    rows = [line.split() for line in out.stdout.strip().splitlines()[-3:]]
    assert [r[0] for r in rows] == ["energy", "forces", "virial"]
    for name, relative, scale in rows:
        assert float(relative) < 1e-12, f"{name} differs by {relative} (relative)"
        assert float(scale) > 0


def test_float32_mode_adds_in_float64(model):
    """The mixed mode (float32 model): float32 descriptors and networks, float64 sums. The total energy of many
    atoms then keeps float64's large atom energies exactly (all-float32 sums lost ~1e-6 relative: 0.8 eV on the
    1,080-atom water)."""
    atoms = _zno(seed=41).repeat((3, 3, 3))  # 432 atoms, energy ~ -650 eV from the atom energies alone
    r64 = model.predict(atoms)
    r32 = model.with_dtype("float32").predict(atoms)
    per_atom = abs(r32["energy"] - r64["energy"]) / len(atoms)
    assert per_atom < 2e-6, f"float32 mode energy off by {per_atom} eV/atom"
    assert abs(r64["energy"]) > 100
    np.testing.assert_allclose(r32["forces"], r64["forces"], atol=1e-4 * np.abs(r64["forces"]).max())


def test_lean_md_graph_equals_the_general_one(model):
    """NeighbourBuilder.build_one (MD: triplets counted, then written into their padded slots) gives the same pairs,
    triplets and slots as build(), without trip_i/trip_mask, and the same energy, forces and virial."""
    atoms = _zno(rattle=0.3, seed=51).repeat((2, 1, 1))
    builder = model.neighbour_builder(skin=0.4)
    structure = model.structure(atoms)
    lean = builder.build_one(*structure)
    # MD rounds capacities in steps of 1/8, evaluation graphs to powers of two (fewer compilations): given the MD
    # layout, build() fills the same slots
    assert builder.build([structure]).layout != lean.layout
    general = builder.build([structure], lean.layout)
    assert lean.layout == general.layout and lean.trip_i is None and lean.trip_mask is None
    assert lean.trip_ij.size > 100 and lean.trip_ij.dtype == np.int32
    full = general.arrays()
    for key, value in lean.arrays().items():
        np.testing.assert_array_equal(value, full[key], err_msg=key)
    a, b = model.evaluate_graph(general), model.evaluate_graph(lean)
    for key in ("energy", "forces", "virial"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-13, atol=1e-12)


def test_an_outgrown_md_layout_grows_with_headroom_where_it_overflowed(model):
    """An MD rebuild whose counts no longer fit the previous layout (a compressed cell: more pairs and triplets) gives
    the blocks and groups that overflowed room for REGROW_HEADROOM times their count, keeps the others' capacities
    (padded slots are masked: the lean-graph test above shows that padding leaves the results alone); a layout that
    still fits is reused as it is."""
    from mlmd_lab.potentials.neighbours import REGROW_HEADROOM, bucket

    builder = model.neighbour_builder(skin=0.4)
    loose = _zno(rattle=0.05, seed=52).repeat((2, 1, 1))
    dense = loose.copy()
    dense.set_cell(dense.cell.array * 0.9, scale_atoms=True)
    old = builder.build_one(*model.structure(loose)).layout
    tight = builder.build_one(*model.structure(dense))
    grown = builder.build_one(*model.structure(dense), old)
    assert builder.build_one(*model.structure(loose), grown.layout).layout == grown.layout
    pairs = [np.count_nonzero(tight.pair_mask[o:o + c]) for o, c in tight.layout.pair_blocks]
    trips = [np.count_nonzero(tight.trip_ij[o:o + c] != tight.trip_ik[o:o + c])  # padding: trip_ij == trip_ik
             for _, o, c in tight.layout.triplet_groups]
    overflowed = 0
    for (_, c_old), (_, c_new), n in zip(old.pair_blocks, grown.layout.pair_blocks, pairs, strict=True):
        assert c_new == (c_old if c_old > n else bucket(int(np.ceil(n * REGROW_HEADROOM))))
        overflowed += c_old <= n
    for (_, _, c_old), (_, _, c_new), n in zip(old.triplet_groups, grown.layout.triplet_groups, trips, strict=True):
        assert c_new == (c_old if c_old > n else bucket(int(np.ceil(n * REGROW_HEADROOM))))
        overflowed += c_old <= n
    assert overflowed > 0, "the compressed cell must overflow some block or group for this test to mean anything"
    assert sum(c for _, c in grown.layout.pair_blocks) > sum(c for _, c in tight.layout.pair_blocks)
    np.testing.assert_array_equal(grown.pair_mask.sum(), tight.pair_mask.sum())  # the same pairs, more padding


def _evaluate_graph_afresh(model, graph):
    """Energies, forces and virials of ``graph`` through a newly traced evaluate (monkeypatched settings apply)."""
    from mlmd_lab.potentials.model import evaluate

    function = jax.jit(lambda params, arrays: evaluate(model.energy_function(), model.padding_distance, params,
                                                       arrays, graph.layout, True))
    out = function(model.parameters(), graph.arrays())
    return {k: np.asarray(out[k]) for k in ("energy", "forces", "virial")}


def test_real_entries_fill_the_first_slots_and_their_counts_are_recorded(model):
    """Graph.pair_count / trip_count: every pair block and triplet group holds its real entries in its first slots,
    then padding only, in a batch of two structures (an evaluation graph) and in an MD graph (lean)."""
    builder = model.neighbour_builder(skin=0.4)
    general = model.graph([_zno(seed=81), _zno(rattle=0.3, seed=82)])
    lean = builder.build_one(*model.structure(_zno(rattle=0.3, seed=83)))
    for graph in (general, lean):
        assert graph.pair_count.dtype == np.int32 and graph.trip_count.dtype == np.int32
        assert graph.pair_count.sum() > 100 and graph.trip_count.sum() > 1000
        for (o, c), n in zip(graph.layout.pair_blocks, graph.pair_count, strict=True):
            assert n < c and graph.pair_mask[o:o + n].all() and not graph.pair_mask[o + n:o + c].any()
        for (_, o, c), n in zip(graph.layout.triplet_groups, graph.trip_count, strict=True):
            real = graph.trip_ij[o:o + c] != graph.trip_ik[o:o + c]  # padding repeats one pair
            assert n < c and real[:n].all() and not real[n:].any()


def test_descriptor_loops_stop_after_the_last_real_entry(model, monkeypatch):
    """With the counts, the loops visit only the chunks that hold real entries and give the energies, forces and
    virials of visiting every slot bit for bit (the padding's chunks add exact zeros), on blocks of several chunks
    followed by several chunks of padding. So that the test can fail: a count that leaves out the last chunk with
    real entries of one group changes the forces (the counts do bound the loops)."""
    import dataclasses

    from mlmd_lab.potentials import descriptors, neighbours

    monkeypatch.setattr(neighbours, "graph_capacity", lambda count: 3 * max(int(count), 8) + 200)
    for name in ("CHUNK", "GRADIENT_CHUNK"):  # the forward and the backward loops
        monkeypatch.setattr(descriptors, name, 64)
    graph = model.graph([_zno(seed=84), _zno(rattle=0.3, seed=85)])
    caps = [c for _, c in graph.layout.pair_blocks] + [c for *_, c in graph.layout.triplet_groups]
    counts = list(graph.pair_count) + list(graph.trip_count)
    assert all(c - n >= 2 * 64 for c, n in zip(caps, counts, strict=True))  # whole chunks of padding everywhere
    counted = _evaluate_graph_afresh(model, graph)
    every = _evaluate_graph_afresh(model, dataclasses.replace(graph, pair_count=None, trip_count=None))
    for key in counted:
        np.testing.assert_array_equal(counted[key], every[key], err_msg=key)
    g = int(np.argmax(graph.trip_count % 64))  # a group whose last visited chunk is partly real
    short = graph.trip_count.copy()
    short[g] -= short[g] % 64
    assert short[g] < graph.trip_count[g]
    cut = _evaluate_graph_afresh(model, dataclasses.replace(graph, trip_count=short))
    assert np.abs(cut["forces"] - counted["forces"]).max() > 1e-6


def test_a_fresh_md_layout_gets_spare_room_within_a_memory_limit(model):
    """build_one(spare=True), as the MD engine's host route and the SLHMC proposals build: every block and group
    gets SPARE more room than its count (then bucket rounding), the results of the tight layout (to rounding: the
    reduction of pair gradients to atoms runs over chunks of the whole pair array, whose boundaries move with the
    blocks' offsets), and the next build of nearby positions reuses the layout (no new compilation). Large systems
    get less: the spare slots stay within SPARE_BYTES."""
    from mlmd_lab.potentials.neighbours import SPARE, SPARE_BYTES, bucket, spare_fraction

    builder = model.neighbour_builder(skin=0.4)
    atoms = _zno(rattle=0.3, seed=86).repeat((2, 1, 1))
    tight = builder.build_one(*model.structure(atoms))
    roomy = builder.build_one(*model.structure(atoms), spare=True)
    for (_, c), n in zip(roomy.layout.pair_blocks, roomy.pair_count, strict=True):
        assert c == bucket(int(np.ceil(n * (1 + SPARE))))
    for (*_, c), n in zip(roomy.layout.triplet_groups, roomy.trip_count, strict=True):
        assert c == bucket(int(np.ceil(n * (1 + SPARE))))
    assert sum(c for *_, c in roomy.layout.triplet_groups) > sum(c for *_, c in tight.layout.triplet_groups)
    a, b = model.evaluate_graph(tight), model.evaluate_graph(roomy)
    for key in ("energy", "forces", "virial"):
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-13 * np.abs(a[key]).max(), err_msg=key)
    nearby = atoms.copy()
    nearby.rattle(0.05, seed=87)
    again = builder.build_one(*model.structure(nearby), roomy.layout, spare=True)
    assert again.layout == roomy.layout and not np.array_equal(again.trip_count, roomy.trip_count)
    assert spare_fraction([1000], [20_000]) == SPARE
    pairs, trips = [5_000_000] * 4, [40_000_000] * 5  # ~69,000 atoms of water
    fraction = spare_fraction(pairs, trips)
    assert 0 < fraction < SPARE / 4
    assert fraction * (64 * sum(pairs) + 8 * sum(trips)) <= SPARE_BYTES * (1 + 1e-12)


def test_positions_path_equals_the_pair_vector_path(model):
    """evaluate's position form (pair vectors built in the loops, gradients straight to positions and cells, virial
    as sum r (x) dE/dr + cell^T dE/dcell) gives the pair-vector form's energies, forces and virials: two structures
    with different cells and images in one batch, and one structure alone (the MD path)."""
    from mlmd_lab.potentials import evaluate

    function = model.energy_function()
    assert hasattr(function, "at_positions")

    def pair_vector_form(*args):  # the same energy function without its position form
        return function(*args)

    small = _zno(rattle=0.3, seed=71)
    small.set_cell(small.cell.array * 0.97, scale_atoms=True)
    for structures in ([_zno(seed=72), small], [small]):
        graph = model.graph(structures)
        layout = graph.layout

        def both(params, arrays, layout=layout):  # compiled: eager evaluation dispatches op by op (minutes)
            return (evaluate(function, model.padding_distance, params, arrays, layout, True),
                    evaluate(pair_vector_form, model.padding_distance, params, arrays, layout, True))

        a, b = jax.jit(both)(model.parameters(), graph.arrays())
        for key in ("energy", "forces", "virial"):
            scale = np.abs(np.asarray(b[key])).max()
            np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=0, atol=1e-12 * scale, err_msg=key)
        assert np.abs(np.asarray(b["virial"])).max() > 0.1


def test_unwrapped_positions_far_from_the_cell_keep_the_energy(model):
    """MD keeps positions unwrapped: an atom 200 cells away needs image shifts beyond int8, which the lean graph
    then stores as int16, with the same energy and forces as the wrapped structure."""
    from mlmd_lab.md.forcefield import forcefield

    ff = forcefield(model, skin=0.3)
    atoms = _zno(rattle=0.2, seed=73)
    moved = atoms.copy()
    moved.positions[0] += 200 * atoms.cell.array[0] - 130 * atoms.cell.array[2]
    arrays, _ = ff.build(moved.positions, moved.cell.array, moved.pbc, ff.species(moved))
    assert arrays["pair_shift"].dtype == np.int16
    assert ff.build(atoms.positions, atoms.cell.array, atoms.pbc, ff.species(atoms))[0]["pair_shift"].dtype == np.int8
    a, b = ff.single_point(atoms), ff.single_point(moved)
    assert abs(a["energy"] - b["energy"]) < 1e-9 * max(1.0, abs(a["energy"]))
    np.testing.assert_allclose(b["forces"], a["forces"], atol=1e-9)
    np.testing.assert_allclose(b["virial"], a["virial"], atol=1e-8)


def test_a_force_call_holds_one_central_elements_pair_vectors_at_a_time():
    """The position route builds the pair vectors (3, P) and their gradient one central element's pairs at a time,
    and builds the vectors again in the backward pass rather than keeping the forward pass's (descriptors.
    _centre_ranges). So a compiled MD force call's temporary buffers stay below two float64 (3, P) arrays, which
    the former whole-range program needed (measured: 57.8 bytes per pair slot for 8,640 atoms of n2p2's water,
    38.7 now; here 55.8 and 33.8). XLA reports the buffers it plans (``memory_analysis``), per CPU device; no
    timing involved."""
    from mlmd_lab.md.forcefield import forcefield
    from mlmd_lab.potentials.descriptors import _centre_ranges

    model = _model(rc=6.0)  # ~90 pairs per atom: the (3, P) arrays outweigh the per-atom ones, as in a liquid
    ff = forcefield(model, skin=0.3)
    atoms = _zno(rattle=0.2, seed=88).repeat((3, 3, 4))  # 576 atoms
    arrays, layout = ff.build(atoms.positions, atoms.cell.array, atoms.pbc, ff.species(atoms))
    ranges = _centre_ranges(layout)
    pairs = sum(c for _, c in layout.pair_blocks)
    assert [c for c, *_ in ranges] == [0, 1] and ranges[0][1] == 0 and ranges[-1][2] == pairs
    R, h = jax.numpy.asarray(atoms.positions), jax.numpy.asarray(atoms.cell.array)
    device = ff.to_device(arrays, layout)
    compiled = jax.jit(lambda a, R, h: ff.compute(a, layout, R, h)).lower(device, R, h).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 2 * 3 * 8 * pairs, f"{temp / pairs:.1f} bytes of temporaries per pair slot"
    largest = max(hi - lo for _, lo, hi in ranges)
    assert temp > 2 * 3 * 8 * largest  # what the test measures: the buffers of the largest element's pairs
    out = compiled(device, R, h)
    reference = model.evaluate_graph(model.graph([atoms]))
    np.testing.assert_allclose(np.asarray(out["forces"]), reference["forces"][: len(atoms)], rtol=0,
                               atol=1e-12 * np.abs(reference["forces"]).max())
