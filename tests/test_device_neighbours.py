"""Neighbour and triplet lists rebuilt in JAX (the MD route for a GPU): the same pairs and triplets as the host
build, overflow reported, and MD on the device route following the host route step for step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from test_potentials_physics import _functions, _model, _zno

from mlmd_lab.errors import MLMDError
from mlmd_lab.md import LennardJones, forcefield, read_log, resume, run
from mlmd_lab.potentials import HDNNP
from mlmd_lab.potentials.device_neighbours import LIST_KEYS, DeviceNeighbours

pytestmark = pytest.mark.filterwarnings("ignore::mlmd_lab.potentials.ExtrapolationWarning")

ARGON = LennardJones()


@pytest.fixture(scope="module")
def model():
    m = _model()
    m.fit_scaling([_zno(seed=1), _zno(seed=2)])
    return m


def _zno_box(repeat, rattle=0.2, seed=3, strain=None) -> Atoms:
    atoms = bulk("ZnO", "wurtzite", a=3.25, c=5.2).repeat(repeat)
    if strain is not None:
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + np.asarray(strain)), scale_atoms=True)
    atoms.rattle(rattle, seed=seed)
    return atoms


def _entries(arrays, layout):
    """Pairs as {(block, i, j, shift)} and triplets as {(group, pair, pair)} (the pair order of a triplet only where
    its two neighbours have different elements), independent of slot order."""
    a = {k: np.asarray(v) for k, v in arrays.items()}
    pair = {}
    for b, (offset, cap) in enumerate(layout.pair_blocks):
        for slot in range(offset, offset + cap):
            if a["pair_mask"][slot]:
                pair[slot] = (b, int(a["pair_i"][slot]), int(a["pair_j"][slot]), tuple(map(int, a["pair_shift"][slot])))
    triplets = set()
    for key, offset, cap in layout.triplet_groups:
        for t in range(offset, offset + cap):
            x, y = int(a["trip_ij"][t]), int(a["trip_ik"][t])
            if x != y:
                ends = (pair[x], pair[y]) if key[1] != key[2] else tuple(sorted((pair[x], pair[y])))
                triplets.add((key, *ends))
    return set(pair.values()), triplets


@pytest.fixture(scope="module")
def narrow_model():
    """Angular functions of type 3 only: triplets need r_jk within the cutoff too (the wide type 9 does not)."""
    m = HDNNP.create(["Zn", "O"], [sf for sf in _functions() if sf.type != 9], hidden=(6, 5), activations="tpl",
                     seed=2, atom_energy={"O": -2.0, "Zn": -1.0})
    m.fit_scaling([_zno(seed=1), _zno(seed=2)])
    return m


@pytest.mark.parametrize("case", ["one-cell axes", "cell list, triclinic", "molecule", "narrow angular functions"])
def test_device_lists_hold_the_host_pairs_and_triplets(model, narrow_model, case):
    """Every pair within cutoff + skin (block, atoms, image) and every triplet of every angular group, as the host
    build has them; then energy, forces and virial from either lists agree to 1e-12."""
    if case == "narrow angular functions":
        model = narrow_model
    if case in ("one-cell axes", "narrow angular functions"):
        atoms = _zno_box((4, 4, 3))
    elif case == "cell list, triclinic":  # >= 3 cells along every axis, 27 neighbour cells, a sheared cell
        atoms = _zno_box((7, 7, 5), strain=[[0, 0.08, 0.05], [0, 0, -0.06], [0.04, 0, 0]])
    else:
        atoms = _zno_box((2, 2, 2))
        atoms.pbc = False
        atoms.center(vacuum=3.0)
    ff = forcefield(model, skin=0.3)
    species = ff.species(atoms)
    arrays, layout = ff.build(atoms.positions, atoms.cell.array, atoms.pbc, species)
    lists = ff.device_lists(layout, species, atoms.pbc, atoms.positions, atoms.cell.array)
    if case == "cell list, triclinic":
        assert min(lists.sizes.grid) >= 3, lists.sizes
    built, ok = jax.jit(lists)(atoms.positions, atoms.cell.array)
    assert bool(ok)
    host_pairs, host_triplets = _entries(arrays, layout)
    pairs, triplets = _entries(built, layout)
    assert len(host_triplets) > 1000 or case == "molecule"
    assert pairs == host_pairs
    assert triplets == host_triplets

    R, h = jnp.asarray(atoms.positions), jnp.asarray(atoms.cell.array)
    # the host's image shifts in the device lists' type, as MD's device route passes them: one compiled program
    # evaluates both lists (the host's own int8 would compile the potential a second time)
    host_arrays = dict(arrays, pair_shift=arrays["pair_shift"].astype(np.int32))
    host = ff.compiled(layout)(ff.to_device(dict(host_arrays), layout), R, h)
    device = ff.compiled(layout)({**ff.to_device(dict(host_arrays), layout), **built}, R, h)
    for key in ("energy", "forces", "virial"):
        scale = float(jnp.max(jnp.abs(host[key])))
        np.testing.assert_allclose(np.asarray(device[key]), np.asarray(host[key]), rtol=0, atol=1e-12 * scale)


def test_lists_that_outgrow_their_capacities_or_a_narrowed_cell_say_so(model):
    """A build sized for one structure reports (ok False) what it cannot hold: a compressed box has more pairs and
    triplets per atom than the capacities, and a cell narrower than twice the cutoff plus skin has several images."""
    ff = forcefield(model, skin=0.3)
    atoms = _zno_box((4, 4, 3), rattle=0.05)
    species = ff.species(atoms)
    _, layout = ff.build(atoms.positions, atoms.cell.array, atoms.pbc, species)
    lists = jax.jit(ff.device_lists(layout, species, atoms.pbc, atoms.positions, atoms.cell.array))
    assert bool(lists(atoms.positions, atoms.cell.array)[1])
    squeezed = atoms.positions * 0.9, atoms.cell.array * 0.9  # 27 % denser: every capacity overflows
    assert not bool(lists(*squeezed)[1])
    narrow = atoms.cell.array.copy()
    narrow[0] *= 0.6  # width 6.8 Å < 2 (4.0 + 0.3) Å
    assert not bool(lists(atoms.positions, narrow)[1])


def test_md_on_the_device_route_follows_the_host_route(model):
    """NVE with many rebuilds (a 0.1 Å skin): the device route rebuilds inside the blocks and gives the host route's
    trajectory (positions to 1e-9 Å), with the same number of rebuilds; the result says where lists were built."""
    atoms = _zno_box((4, 4, 3), rattle=0.05)
    kw = dict(temperature=300, timestep=0.5, steps=60, skin=0.1, block=25, log_interval=5)
    host = run(model, atoms, "nve", neighbours="host", **kw)
    device = run(model, atoms, "nve", neighbours="device", **kw)
    assert device.rebuilds == host.rebuilds >= 5
    assert device.device_rebuilds == device.rebuilds - 1  # all but the first build
    assert "rebuilt on the device" in device.compute and "on the host" in host.compute
    np.testing.assert_allclose(device.atoms.positions, host.atoms.positions, rtol=0, atol=1e-9)
    np.testing.assert_allclose(device.thermo["etot_eV"], host.thermo["etot_eV"], rtol=0, atol=1e-9)


def test_npt_on_the_device_route_rebuilds_for_the_changing_cell():
    """NPT: the device lists follow the cell (skin rule with cell changes); the run matches the host route."""
    atoms = bulk("Ar", "fcc", a=5.40, cubic=True).repeat(4)
    atoms.rattle(0.02, seed=2)
    kw = dict(temperature=60, pressure=0.05, timestep=5.0, steps=300, skin=0.3, barostat_time=200.0,
              compressibility=0.5, log_interval=10)
    host = run(ARGON, atoms, "npt", neighbours="host", **kw)
    device = run(ARGON, atoms, "npt", neighbours="device", **kw)
    assert device.device_rebuilds >= 3 and device.rebuilds == host.rebuilds
    assert np.ptp(device.thermo["volume_A3"]) > 1.0
    np.testing.assert_allclose(device.atoms.positions, host.atoms.positions, rtol=0, atol=1e-8)
    np.testing.assert_allclose(device.atoms.cell.array, host.atoms.cell.array, rtol=0, atol=1e-8)


def test_resume_on_the_device_route_repeats_the_uninterrupted_run_exactly(tmp_path):
    """The restart's reference positions give the same device lists, so a resumed Langevin run is bit for bit
    the uninterrupted one."""
    atoms = bulk("Ar", "fcc", a=5.40, cubic=True).repeat(4)
    atoms.rattle(0.02, seed=3)
    kw = dict(temperature=50, timestep=5.0, log_interval=10, skin=0.3, neighbours="device")
    whole = run(ARGON, atoms, "langevin", steps=200, **kw)
    assert whole.device_rebuilds >= 2
    run(ARGON, atoms, "langevin", steps=90, workdir=tmp_path, restart_interval=50, **kw)
    rest = resume(ARGON, tmp_path, steps=110)
    np.testing.assert_array_equal(rest.atoms.positions, whole.atoms.positions)
    np.testing.assert_array_equal(read_log(tmp_path)["etot_eV"], whole.thermo["etot_eV"])


def test_the_route_is_chosen_and_a_narrow_cell_is_refused_by_name():
    """On the CPU "auto" stays on the host (faster there) and says so; "device" with a cell narrower than twice
    the cutoff plus skin is refused with the reason and the fix; an unknown route is named."""
    small = bulk("Ar", "fcc", a=5.40, cubic=True).repeat(3)  # 16.2 Å < 2 (8.5 + 0.5) Å
    ff = forcefield(ARGON, skin=0.5)
    on_device, why = ff.neighbour_route(small, "auto")
    assert not on_device and "faster route on the CPU" in why
    with pytest.raises(MLMDError, match="narrower.*neighbours='host'"):
        run(ARGON, small, "nve", temperature=30, steps=5, neighbours="device")
    with pytest.raises(MLMDError, match="neighbours must be 'auto', 'host' or 'device'"):
        run(ARGON, small, "nve", temperature=30, steps=5, neighbours="gpu")


def test_list_keys_are_the_arrays_a_build_writes(model):
    ff = forcefield(model, skin=0.3)
    atoms = _zno_box((4, 4, 3))
    species = ff.species(atoms)
    arrays, layout = ff.build(atoms.positions, atoms.cell.array, atoms.pbc, species)
    built, _ = DeviceNeighbours(ff.builder, layout, species, atoms.pbc, atoms.positions,
                                atoms.cell.array)(atoms.positions, atoms.cell.array)
    assert set(built) == set(LIST_KEYS) and set(LIST_KEYS) <= set(arrays)
    for key in LIST_KEYS:
        assert built[key].shape == arrays[key].shape
