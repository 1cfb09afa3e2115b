"""n2p2 input.data reader/writer: real files, unit conversion, exact round trips, bad input."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from ase import units

from mlmd_lab.errors import InputFileError, UnitsError
from mlmd_lab.frames import labelled_atoms, results_of
from mlmd_lab.io.n2p2 import iter_input_data, read_input_data, write_input_data

EXTERNAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "external"
H2O = EXTERNAL / "n2p2" / "H2O_RPBE-D3"
CU2S = EXTERNAL / "n2p2" / "Cu2S_PBE"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    return path


def _frames(n: int = 3, periodic: bool = True, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = labelled_atoms(
            ["O", "H", "H", "Cu"],
            rng.normal(size=(4, 3)) * 3.0,
            cell=np.diag([10.0, 11.0, 12.0]) + rng.normal(size=(3, 3)) * 0.1 if periodic else None,
            pbc=periodic,
            energy=float(rng.normal() * 100),
            forces=rng.normal(size=(4, 3)),
            info={"step": i, "comment": f"frame {i}"},
        )
        out.append(atoms)
    return out


def test_h2o_set20_values_converted_from_hartree_bohr():
    path = _need(H2O / "input.data.set20")
    frames = read_input_data(path, "Ha", "Bohr")
    assert len(frames) == 20
    first = frames[0]
    assert len(first) == 192
    assert [a.info["step"] for a in frames] == list(range(20))
    assert first.info["comment"] == "written by RuNNerDecom"
    assert first.info["charge"] == 0.0
    # from the file text: first atom line, lattice and energy of structure 0
    # atom 3.735290838 2.327841157 3.501304856 O -0.226389360 0.0 -0.006530137 -0.002852459 -0.027992554
    assert first.get_chemical_symbols()[0] == "O"
    np.testing.assert_allclose(
        first.positions[0], np.array([3.735290838, 2.327841157, 3.501304856]) * units.Bohr, rtol=1e-15
    )
    np.testing.assert_allclose(
        first.get_forces()[0],
        np.array([-0.006530137, -0.002852459, -0.027992554]) * units.Hartree / units.Bohr,
        rtol=1e-15,
    )
    assert first.get_potential_energy() == pytest.approx(-4900.37328433 * units.Hartree, rel=1e-15)
    np.testing.assert_allclose(first.cell.array, np.eye(3) * 24.623508 * units.Bohr, rtol=1e-15)
    assert first.pbc.all()
    assert first.arrays["initial_charges"][0] == pytest.approx(-0.22638936)
    assert len(frames[1]) == 48  # second structure: 14.782194 Bohr box


def test_h2o_single_large_structure():
    frames = read_input_data(_need(H2O / "input.data"), "Ha", "Bohr")
    assert len(frames) == 1
    assert len(frames[0]) == 1080
    assert frames[0].get_forces().shape == (1080, 3)


def test_cu2s_in_ev_angstrom():
    path = _need(CU2S / "input.data.set20")
    frames = read_input_data(path, "eV", "Angstrom")
    assert len(frames) == 20
    first = frames[0]
    assert first.info["comment"] == "source_file_name=OUTCAR_4_1"
    np.testing.assert_allclose(first.cell.array[2], [-6.055885795, 0.0, 12.226281044])
    np.testing.assert_allclose(first.get_forces()[0], [0.107416, 0.024235, -0.891279])
    assert set(first.get_chemical_symbols()) <= {"Cu", "S"}
    assert len(read_input_data(_need(CU2S / "input.data"), "eV", "Angstrom")) >= 1


def test_iter_is_lazy():
    gen = iter_input_data(_need(H2O / "input.data.set20"), "Ha", "Bohr")
    assert isinstance(gen, types.GeneratorType)
    assert next(gen).info["step"] == 0


def test_units_are_checked():
    with pytest.raises(UnitsError):
        read_input_data(_need(H2O / "input.data.set20"), "Hartrees", "Bohr")
    with pytest.raises(TypeError):
        read_input_data(H2O / "input.data.set20")  # type: ignore[call-arg]


@pytest.mark.parametrize("eunit,lunit", [("eV", "Angstrom"), ("Ha", "Bohr")])
def test_write_read_round_trip(tmp_path, eunit, lunit):
    frames = _frames(3) + _frames(1, periodic=False, seed=5)
    frames[0].set_initial_charges([0.1, -0.2, 0.3, -0.4])
    out = tmp_path / "input.data"
    assert write_input_data(out, frames, eunit, lunit) == 4
    back = read_input_data(out, eunit, lunit)
    assert len(back) == 4
    exact = eunit == "eV"
    rtol = 0 if exact else 1e-15
    for a, b in zip(frames, back, strict=True):
        assert b.get_chemical_symbols() == a.get_chemical_symbols()
        np.testing.assert_allclose(b.positions, a.positions, rtol=rtol, atol=0)
        np.testing.assert_allclose(b.cell.array, a.cell.array, rtol=rtol, atol=0)
        ra = results_of(a)  # (a.get_forces() would refuse: charges were set after the results)
        np.testing.assert_allclose(b.get_forces(), ra["forces"], rtol=rtol, atol=0)
        assert b.get_potential_energy() == pytest.approx(ra["energy"], rel=rtol, abs=0)
        assert list(b.pbc) == list(a.pbc)
        assert b.info["comment"] == a.info["comment"]
    np.testing.assert_array_equal(back[0].get_initial_charges(), [0.1, -0.2, 0.3, -0.4])
    assert back[0].info["charge"] == pytest.approx(-0.2)


def test_real_file_round_trip(tmp_path):
    frames = read_input_data(_need(H2O / "input.data.set20"), "Ha", "Bohr")
    out = tmp_path / "input.data"
    write_input_data(out, frames, "Ha", "Bohr")
    back = read_input_data(out, "Ha", "Bohr")
    for a, b in zip(frames, back, strict=True):
        np.testing.assert_allclose(b.positions, a.positions, rtol=1e-15)
        np.testing.assert_allclose(b.get_forces(), a.get_forces(), rtol=1e-15)
        np.testing.assert_array_equal(b.get_initial_charges(), a.get_initial_charges())
        assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), rel=1e-15)


def test_blank_and_comment_lines_tolerated(tmp_path):
    text = """
# generated by hand
  begin
comment first
comment second

lattice 5.0 0.0 0.0
lattice 0.0 5.0 0.0
lattice 0.0 0.0 5.0
atom 0.0 0.0 0.0 H 0.0 0.0 0.1 0.2 0.3
   atom 1.0 0.0 0.0 H 0.0 0.0 -0.1 -0.2 -0.3
energy -1.5
charge 0.0
  end

begin
atom 0.0 0.0 0.0 He 0.0 0.0 0.0 0.0 0.0
energy 2.0D0
end
"""
    path = tmp_path / "input.data"
    path.write_text(text)
    frames = read_input_data(path, "eV", "Angstrom")
    assert len(frames) == 2
    assert frames[0].info["comment"] == "first\nsecond"
    assert frames[0].get_forces()[1] == pytest.approx([-0.1, -0.2, -0.3])
    assert not frames[1].pbc.any()
    assert frames[1].get_potential_energy() == 2.0
    assert "charge" not in frames[1].info


_GOOD = """begin
lattice 5.0 0.0 0.0
lattice 0.0 5.0 0.0
lattice 0.0 0.0 5.0
atom 0.0 0.0 0.0 H 0.0 0.0 0.1 0.2 0.3
atom 1.0 0.0 0.0 H 0.0 0.0 -0.1 -0.2 -0.3
energy -1.5
charge 0.0
end
"""


@pytest.mark.parametrize(
    "text,expected",
    [
        (_GOOD + "begin\natom 0 0 0 H 0 0 0 0 0\n", "no 'end'"),
        (
            _GOOD.replace("atom 1.0 0.0 0.0 H 0.0 0.0 -0.1 -0.2 -0.3", "atom 1.0 0.0 H 0.0 0.0 -0.1 -0.2 -0.3"),
            "line 6: malformed atom line",
        ),
        (_GOOD.replace("atom 1.0 0.0 0.0 H 0.0 0.0 -0.1", "atom 1.0 x 0.0 H 0.0 0.0 -0.1"), "line 6: malformed"),
        (_GOOD.replace("0.0 H 0.0 0.0 -0.1", "0.0 Xx 0.0 0.0 -0.1"), "line 6: unknown element 'Xx'"),
        (_GOOD.replace("energy -1.5\n", ""), "line 8: structure 0 (begun at line 1) has no 'energy' line"),
        (_GOOD.replace("lattice 0.0 0.0 5.0\n", ""), "line 4: 2 lattice lines"),
        (_GOOD.replace("begin", "begn"), "line 1: expected 'begin'"),
        (_GOOD.replace("charge 0.0", "charge"), "line 8: 'charge' needs one value"),
        (_GOOD.replace("end\n", "begin\n"), "line 9: 'begin' before the 'end'"),
        (_GOOD.replace("charge 0.0", "forces 1 2 3"), "line 8: unknown keyword 'forces'"),
    ],
)
def test_bad_input(tmp_path, text, expected):
    path = tmp_path / "input.data"
    path.write_text(text)
    with pytest.raises(InputFileError) as err:
        read_input_data(path, "eV", "Angstrom")
    assert str(path) in str(err.value)
    assert expected in str(err.value)
    assert err.value.fix


def test_not_text_and_missing_file(tmp_path):
    path = tmp_path / "input.data"
    path.write_bytes(b"begin\n\xff\xfe\x00 atom\n")
    with pytest.raises(InputFileError, match="not a text file"):
        read_input_data(path, "eV", "Angstrom")
    with pytest.raises(InputFileError, match="cannot open"):
        read_input_data(tmp_path / "nope.data", "eV", "Angstrom")


def test_write_refuses_unlabelled_frames(tmp_path):
    frames = _frames(3)
    frames[1] = labelled_atoms(["H"], [[0, 0, 0]], cell=np.eye(3) * 5, pbc=True, energy=1.0)
    out = tmp_path / "input.data"
    with pytest.raises(InputFileError, match="frame 1 has no forces") as err:
        write_input_data(out, frames)
    assert str(out) in str(err.value)
    assert not out.exists()
    partial = labelled_atoms(
        ["H"], [[0, 0, 0]], cell=np.eye(3) * 5, pbc=[True, True, False], energy=1.0, forces=[[0, 0, 0]]
    )
    with pytest.raises(InputFileError, match="frame 0 is periodic in some directions"):
        write_input_data(out, [partial])


def test_write_comment_argument(tmp_path):
    out = tmp_path / "input.data"
    write_input_data(out, _frames(2), comment="exported")
    assert [a.info["comment"] for a in read_input_data(out, "eV", "Angstrom")] == ["exported", "exported"]
