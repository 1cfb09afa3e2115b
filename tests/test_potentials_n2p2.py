"""HDNNP against n2p2's own results, and n2p2 file round trips."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
from conftest import external

from mlmd_lab.errors import InputFileError, MLMDError, UnitsError
from mlmd_lab.io.n2p2 import read_input_data, write_input_data
from mlmd_lab.potentials import HDNNP, SymmetryFunction
from mlmd_lab.potentials.n2p2_files import read_input_nn

# name, energy unit, length unit, n2p2 energy of input.data, n2p2 RMSEs over input.data.set20 (per atom, force)
CASES = {
    "H2O_RPBE-D3": ("Ha", "Bohr", -27564.547347815904, 2.86565e-5, 7.41795e-4),
    "Cu2S_PBE": ("eV", "Angstrom", -573.65603183874589, 9.79375e-4, 4.22436e-2),
}


def _load(name):
    energy_unit, length_unit = CASES[name][:2]
    folder = external(f"n2p2/{name}")
    return folder, HDNNP.from_n2p2(folder, energy_unit=energy_unit, length_unit=length_unit)


def _energy_in_model_units(model, atoms):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.predict(atoms)["energy"] / model.energy_factor


@pytest.mark.parametrize("name", sorted(CASES))
def test_energy_equals_n2p2(name):
    folder, model = _load(name)
    energy_unit, length_unit, reference = CASES[name][:3]
    atoms = read_input_data(folder / "input.data", energy_unit, length_unit)[0]
    energy = _energy_in_model_units(model, atoms)
    assert abs(energy - reference) / abs(reference) < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_rmse_over_set20_equals_n2p2(name):
    folder, model = _load(name)
    energy_unit, length_unit, _, e_rmse, f_rmse = CASES[name]
    frames = read_input_data(folder / "input.data.set20", energy_unit, length_unit)
    assert len(frames) == 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = model.predict(frames)
    ef, lf = model.energy_factor, model.length_factor
    de = [(r["energy"] - a.get_potential_energy()) / len(a) / ef for r, a in zip(results, frames, strict=True)]
    df = np.concatenate([((r["forces"] - a.get_forces()) * lf / ef).ravel() for r, a in zip(results, frames,
                                                                                            strict=True)])
    # n2p2 prints 6 significant digits.
    assert np.sqrt(np.mean(np.square(de))) == pytest.approx(e_rmse, rel=2e-6)
    assert np.sqrt(np.mean(np.square(df))) == pytest.approx(f_rmse, rel=2e-6)


def test_elements_and_functions_in_n2p2_order():
    _, model = _load("Cu2S_PBE")
    assert model.elements == ("S", "Cu")  # by atomic number, whatever input.nn lists
    s_functions = model.functions["S"]
    types = [sf.type for sf in s_functions]
    assert types == sorted(types)
    assert model.settings.cutoff_type == 6 and model.settings.scaling == "scalesigma"
    assert model.settings.activations == "ppl"


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_predicts_identically(name, tmp_path):
    folder, model = _load(name)
    energy_unit, length_unit = CASES[name][:2]
    atoms = read_input_data(folder / "input.data", energy_unit, length_unit)[0]
    model.to_n2p2(tmp_path / "copy")
    again = HDNNP.from_n2p2(tmp_path / "copy", energy_unit=energy_unit, length_unit=length_unit)
    assert again.functions == model.functions
    for element in model.elements:
        for (w1, b1), (w2, b2) in zip(model.networks[element], again.networks[element], strict=True):
            assert np.array_equal(w1, w2) and np.array_equal(b1, b2)
        assert np.array_equal(model.scaling_stats[element], again.scaling_stats[element])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = model.predict(atoms), again.predict(atoms)
    assert first["energy"] == second["energy"]
    assert np.array_equal(first["forces"], second["forces"])
    # Written again, the files are identical (a fixed point).
    again.to_n2p2(tmp_path / "copy2")
    for path in (tmp_path / "copy").iterdir():
        assert path.read_text() == (tmp_path / "copy2" / path.name).read_text()


def test_kept_keywords_survive_round_trip(tmp_path):
    folder, model = _load("H2O_RPBE-D3")
    model.to_n2p2(tmp_path)
    settings = read_input_nn(tmp_path / "input.nn")
    assert settings.mean_energy == model.settings.mean_energy
    assert settings.conv_energy == model.settings.conv_energy
    assert settings.scaling == "scalecenter"
    assert (tmp_path / "weights.001.data").exists() and (tmp_path / "weights.008.data").exists()


def test_created_model_round_trips(tmp_path, water_like):
    model = HDNNP.create(["O", "H"], cutoff=4.0, hidden=(8, 8), seed=3)
    model.fit_scaling([water_like])
    _randomise_output(model)
    model.to_n2p2(tmp_path)
    again = HDNNP.from_n2p2(tmp_path)
    first, second = model.predict(water_like), again.predict(water_like)
    assert first["energy"] == second["energy"]
    assert np.array_equal(first["forces"], second["forces"])


def _randomise_output(model, seed=0):
    rng = np.random.default_rng(seed)
    for element in model.elements:
        W, b = model.networks[element][-1]
        model.networks[element][-1] = (rng.normal(0, 0.3, W.shape), b)
    model._cache.clear()


@pytest.fixture
def water_like():
    from ase.build import molecule

    atoms = molecule("H2O")
    atoms.center(vacuum=1.5)
    return atoms.repeat((2, 2, 2))


def _drop_last_lines(path, n=5):
    path.write_text("\n".join(path.read_text().splitlines()[:-n]) + "\n")


def _drop_element_2_scaling(path):
    lines = [line for line in path.read_text().splitlines() if not line.strip().startswith("2 ")]
    path.write_text("\n".join(lines) + "\n")


def _append_type_12(path):
    path.write_text(path.read_text() + "symfunction_short S 12 0.1 0.0 6.0\n")


@pytest.mark.parametrize("damage,error,message", [
    (lambda folder: (folder / "weights.029.data").unlink(), InputFileError, "weights.029.data: file not found"),
    (lambda folder: _drop_last_lines(folder / "weights.016.data"), MLMDError, "weights.016.data.*connections"),
    (lambda folder: _drop_element_2_scaling(folder / "scaling.data"), InputFileError, "lacks scaling data"),
    (lambda folder: _append_type_12(folder / "input.nn"), InputFileError, "type 12 .* not supported"),
], ids=["missing-weights", "truncated-weights", "foreign-scaling", "unsupported-type"])
def test_damaged_potential_files_are_named(tmp_path, damage, error, message):
    folder, _ = _load("Cu2S_PBE")
    copy = tmp_path / "pot"
    shutil.copytree(folder, copy)
    for path in copy.iterdir():
        path.chmod(0o644)  # the shared originals are read-only
    damage(copy)
    with pytest.raises(error, match=message):
        HDNNP.from_n2p2(copy)


def test_unknown_element_in_structure_is_named():
    from ase import Atoms

    _, model = _load("Cu2S_PBE")
    with pytest.raises(MLMDError, match=r"knows \['S', 'Cu'\].*\['Fe'\]"):
        model.predict(Atoms("Fe2", positions=[[0, 0, 0], [2, 0, 0]]))


def test_symmetry_function_line_round_trip():
    sf = SymmetryFunction("H", 3, ("O", "H"), eta=0.07, rc=12.0, lam=-1.0, zeta=4.0)
    assert sf.neighbours == ("H", "O")  # ordered by atomic number, as n2p2 does
    assert SymmetryFunction.from_n2p2(sf.to_n2p2()) == sf
    radial = SymmetryFunction.from_n2p2("symfunction_short Cu 2 S 2.000E+00 1.500E+00 6.000E+00")
    assert (radial.eta, radial.rs, radial.rc) == (2.0, 1.5, 6.0)


# -- units (issue 20.6): given, stated in input.nn, inferred from the data beside it, or refused ------------
def _unstated_copy(tmp_path, name, data=True):
    """A copy of a shared potential whose input.nn states no units (its 'Energy unit'/'Length unit' comments
    removed), with or without the input.data files beside it."""
    copy = tmp_path / name
    shutil.copytree(external(f"n2p2/{name}"), copy)
    for path in copy.iterdir():
        path.chmod(0o644)
        if not data and path.name.startswith("input.data"):
            path.unlink()
    text = (copy / "input.nn").read_text()
    (copy / "input.nn").write_text("".join(ln for ln in text.splitlines(keepends=True) if "unit" not in ln.lower()))
    return copy


@pytest.mark.parametrize("name", sorted(CASES))
def test_units_stated_in_input_nn_are_used_and_recorded(name):
    """n2p2's examples state their units in input.nn comments; without units= they were read as eV and Å."""
    folder = external(f"n2p2/{name}")
    model = HDNNP.from_n2p2(folder)
    assert (model.energy_unit, model.length_unit) == CASES[name][:2]
    record = model.metadata["n2p2_units"]
    assert record["source"] == "stated" and "input.nn (comment lines 4, 5)" in record["evidence"]
    given = HDNNP.from_n2p2(folder, units=CASES[name][:2])
    assert given.metadata["n2p2_units"]["source"] == "given" and given.energy_factor == model.energy_factor


def test_units_written_by_mlmd_lab_are_stated(tmp_path, water_like):
    model = HDNNP.create(["O", "H"], cutoff=4.0, hidden=(4,), activations="tl")
    model.energy_unit, model.length_unit = "Ha", "Bohr"
    model.to_n2p2(tmp_path)
    again = HDNNP.from_n2p2(tmp_path)
    assert (again.energy_unit, again.length_unit) == ("Ha", "Bohr")
    assert again.metadata["n2p2_units"]["source"] == "stated"


def test_units_contradicting_input_nn_are_refused():
    folder = external("n2p2/H2O_RPBE-D3")
    with pytest.raises(UnitsError, match=r"units \('eV', 'Angstrom'\) were given, but .*input.nn .*states energy "
                                         r"Ha, length Bohr"):
        HDNNP.from_n2p2(folder, units=("eV", "Angstrom"))
    with pytest.raises(UnitsError, match="give both the energy and the length unit"):
        HDNNP.from_n2p2(folder, energy_unit="Ha")
    assert HDNNP.from_n2p2(folder, "Hartree", "bohr").energy_factor == pytest.approx(27.211386, rel=1e-6)


def test_no_units_anywhere_is_refused_saying_how_to_pass_them(tmp_path):
    folder = _unstated_copy(tmp_path, "H2O_RPBE-D3", data=False)
    with pytest.raises(UnitsError, match=r"n2p2 files carry no units.*no input.data.*units=\('Ha', 'Bohr'\)"):
        HDNNP.from_n2p2(folder)
    assert HDNNP.from_n2p2(folder, units="Ha,Bohr").metadata["n2p2_units"]["source"] == "given"


def test_bohr_data_give_the_length_but_not_the_energy_unit(tmp_path):
    """Water in Bohr: the geometry says Bohr, but nothing in the data tells Hartree from Rydberg: refused."""
    folder = _unstated_copy(tmp_path, "H2O_RPBE-D3")
    with pytest.raises(UnitsError, match=r"length unit is Bohr \(in input.data the median nearest-neighbour "
                                         r"distance is 1.9\d covalent-radius sums .*1.0\d in Å.*\).*Ha or Ry.*"
                                         r"units=\('Ha', 'Bohr'\)"):
        HDNNP.from_n2p2(folder)


@pytest.mark.slow
def test_angstrom_data_that_the_potential_reproduces_give_ev_and_angstrom(tmp_path):
    from mlmd_lab.potentials.n2p2_units import UnitsInferredWarning

    folder = _unstated_copy(tmp_path, "Cu2S_PBE")
    with pytest.warns(UnitsInferredWarning, match=r"using energy eV, length Angstrom, inferred: .*0\.9\d+ covalent"):
        model = HDNNP.from_n2p2(folder)
    assert (model.energy_unit, model.length_unit) == ("eV", "Angstrom")
    record = model.metadata["n2p2_units"]
    assert record["source"] == "inferred" and "reproduces the energies of 1 structure(s) of input.data" in \
        record["evidence"]


@pytest.mark.slow
def test_data_in_other_energy_units_than_the_potential_are_no_evidence(tmp_path):
    """The same Cu2S potential beside its data converted to Hartree: the energies do not match, refused."""
    folder = _unstated_copy(tmp_path, "Cu2S_PBE")
    frames = read_input_data(folder / "input.data", "eV", "Angstrom")
    (folder / "input.data.set20").unlink()
    write_input_data(folder / "input.data", frames, "Ha", "Angstrom")
    with pytest.raises(UnitsError, match=r"does not reproduce the energies of input.data \(relative difference "
                                         r"up to 26 on 1 structure"):
        HDNNP.from_n2p2(folder)
