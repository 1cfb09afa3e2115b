"""DeePMD npy systems: real water data, exact round trips, virial sign, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import units

from mlmd_lab.errors import InputFileError
from mlmd_lab.frames import labelled_atoms, results_of
from mlmd_lab.io.deepmd import is_deepmd_dir, read_deepmd, write_deepmd

EXTERNAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "external"
WATER = EXTERNAL / "deepmd-water"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    return path


def _frames(n: int = 4, stress: bool = True, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cell = np.array([[8.0, 0.0, 0.0], [1.0, 9.0, 0.0], [0.5, -0.7, 10.0]]) + rng.normal(size=(3, 3)) * 0.05
        out.append(
            labelled_atoms(
                ["O", "H", "H", "O", "H", "H"],
                rng.uniform(0, 8, size=(6, 3)),
                cell=cell,
                pbc=True,
                energy=float(rng.normal() * 50),
                forces=rng.normal(size=(6, 3)),
                stress=rng.normal(size=6) * 0.01 if stress else None,
                info={"step": i},
            )
        )
    return out


def _assert_same(a, b, rtol=0.0):
    ra, rb = results_of(a), results_of(b)
    assert b.get_chemical_symbols() == a.get_chemical_symbols()
    np.testing.assert_allclose(b.positions, a.positions, rtol=rtol, atol=0)
    np.testing.assert_allclose(b.cell.array, a.cell.array, rtol=rtol, atol=1e-300)
    np.testing.assert_allclose(rb["forces"], ra["forces"], rtol=rtol, atol=0)
    assert rb["energy"] == pytest.approx(ra["energy"], rel=rtol, abs=0)
    if "stress" in ra:
        np.testing.assert_allclose(rb["stress"], ra["stress"], rtol=max(rtol, 1e-14), atol=1e-18)
    assert list(b.pbc) == list(a.pbc)


def test_real_water_320_frames():
    total = 0
    for name, n_expected in (("data_0", 80), ("data_1", 160), ("data_2", 80)):
        folder = _need(WATER / name)
        assert is_deepmd_dir(folder)
        frames = read_deepmd(folder)
        assert len(frames) == n_expected
        total += len(frames)
        sets = sorted(folder.glob("set.*"))
        energies = np.concatenate([np.load(s / "energy.npy") for s in sets])
        boxes = np.concatenate([np.load(s / "box.npy") for s in sets])
        coords = np.concatenate([np.load(s / "coord.npy") for s in sets])
        forces = np.concatenate([np.load(s / "force.npy") for s in sets])
        assert energies.dtype == np.float32
        got = np.array([a.get_potential_energy() for a in frames])
        np.testing.assert_array_equal(got, energies.astype(np.float64))
        for j in (0, len(frames) - 1):
            a = frames[j]
            assert len(a) == 192
            assert a.positions.dtype == np.float64
            np.testing.assert_array_equal(a.cell.array, boxes[j].astype(np.float64).reshape(3, 3))
            np.testing.assert_array_equal(a.positions, coords[j].astype(np.float64).reshape(192, 3))
            np.testing.assert_array_equal(a.get_forces(), forces[j].astype(np.float64).reshape(192, 3))
            assert a.pbc.all()
            assert a.info["step"] == j
        assert a.get_chemical_symbols().count("O") == 64
        assert a.get_chemical_symbols().count("H") == 128
        if name == "data_1":
            assert frames[0].info["set"] == "set.000"
            assert frames[-1].info["set"] == "set.001"
            assert frames[80].info["step"] == 80
    assert total == 320


def test_is_deepmd_dir(tmp_path):
    assert not is_deepmd_dir(tmp_path)
    assert not is_deepmd_dir(tmp_path / "missing")
    (tmp_path / "type.raw").write_text("0\n")
    assert not is_deepmd_dir(tmp_path)
    (tmp_path / "set.000").mkdir()
    assert is_deepmd_dir(tmp_path)


def test_round_trip_ev_angstrom_with_sets(tmp_path):
    frames = _frames(7)
    names = write_deepmd(tmp_path / "sys", frames, set_size=3)
    assert names == ["set.000", "set.001", "set.002"]
    assert np.load(tmp_path / "sys" / "set.000" / "coord.npy").dtype == np.float64
    assert (tmp_path / "sys" / "type.raw").read_text().split() == ["0", "1", "1", "0", "1", "1"]
    assert (tmp_path / "sys" / "type_map.raw").read_text().split() == ["O", "H"]
    back = read_deepmd(tmp_path / "sys")
    assert len(back) == 7
    assert [a.info["set"] for a in back] == ["set.000"] * 3 + ["set.001"] * 3 + ["set.002"]
    assert [a.info["step"] for a in back] == list(range(7))
    for a, b in zip(frames, back, strict=True):
        _assert_same(a, b)


def test_round_trip_hartree_bohr(tmp_path):
    frames = _frames(3)
    write_deepmd(tmp_path / "sys", frames, energy_unit="Ha", length_unit="Bohr")
    raw = np.load(tmp_path / "sys" / "set.000" / "energy.npy")
    assert raw[0] == pytest.approx(frames[0].get_potential_energy() / units.Hartree, rel=1e-15)
    back = read_deepmd(tmp_path / "sys", energy_unit="Ha", length_unit="Bohr")
    for a, b in zip(frames, back, strict=True):
        _assert_same(a, b, rtol=1e-14)


def test_virial_sign_and_round_trip(tmp_path):
    cell = np.diag([10.0, 8.0, 5.0])  # volume 400 Å^3
    stress = np.array([0.01, 0.02, 0.03, 0.004, 0.005, 0.006])  # xx yy zz yz xz xy, tensile > 0
    frame = labelled_atoms(["Ar"], [[0, 0, 0]], cell=cell, pbc=True, energy=-1.0, forces=[[0, 0, 0]], stress=stress)
    write_deepmd(tmp_path / "sys", [frame])
    virial = np.load(tmp_path / "sys" / "set.000" / "virial.npy")
    assert virial.shape == (1, 9)
    expected = -400.0 * np.array([[0.01, 0.006, 0.005], [0.006, 0.02, 0.004], [0.005, 0.004, 0.03]])
    np.testing.assert_allclose(virial[0].reshape(3, 3), expected, rtol=1e-15)
    back = read_deepmd(tmp_path / "sys")
    np.testing.assert_allclose(back[0].get_stress(), stress, rtol=1e-15)


def test_no_virial_without_stress_and_nopbc(tmp_path):
    write_deepmd(tmp_path / "a", _frames(2, stress=False))
    assert not (tmp_path / "a" / "set.000" / "virial.npy").exists()
    assert "stress" not in results_of(read_deepmd(tmp_path / "a")[0])
    mol = [
        labelled_atoms(["H", "H"], [[0, 0, 0], [0.74, 0, 0]], energy=-31.0 - i, forces=[[1, 0, 0], [-1, 0, 0]])
        for i in range(2)
    ]
    write_deepmd(tmp_path / "m", mol)
    assert (tmp_path / "m" / "nopbc").exists()
    back = read_deepmd(tmp_path / "m")
    assert not back[0].pbc.any()
    _assert_same(mol[1], back[1])


def test_type_map_argument_and_missing_type_map(tmp_path):
    write_deepmd(tmp_path / "sys", _frames(2), type_map=["H", "O", "C"])
    assert (tmp_path / "sys" / "type.raw").read_text().split() == ["1", "0", "0", "1", "0", "0"]
    (tmp_path / "sys" / "type_map.raw").unlink()
    with pytest.raises(InputFileError, match="type_map") as err:
        read_deepmd(tmp_path / "sys")
    assert str(tmp_path / "sys") in str(err.value)
    frames = read_deepmd(tmp_path / "sys", type_map=["H", "O", "C"])
    assert frames[0].get_chemical_symbols() == ["O", "H", "H", "O", "H", "H"]
    with pytest.raises(InputFileError, match="type map has 1 entries"):
        read_deepmd(tmp_path / "sys", type_map=["H"])


def test_write_refusals(tmp_path):
    frames = _frames(3)
    with pytest.raises(InputFileError, match="lacks"):
        write_deepmd(tmp_path / "x", frames, type_map=["O"])
    other = _frames(1)[0][[1, 0, 2, 3, 4, 5]]
    other.calc = frames[0].calc
    with pytest.raises(InputFileError, match="frame 1 has other atoms"):
        write_deepmd(tmp_path / "y", [frames[0], other])
    bare = frames[2].copy()
    with pytest.raises(InputFileError, match="frame 2 has no energy or forces"):
        write_deepmd(tmp_path / "z", [frames[0], frames[1], bare])
    write_deepmd(tmp_path / "w", frames)
    with pytest.raises(InputFileError, match="already exists"):
        write_deepmd(tmp_path / "w", frames)


@pytest.fixture
def system(tmp_path):
    path = tmp_path / "sys"
    write_deepmd(path, _frames(3))
    return path


def _expect_error(path: Path, match: str, **kwargs):
    with pytest.raises(InputFileError, match=match) as err:
        read_deepmd(path, **kwargs)
    assert str(path) in str(err.value)
    return err.value


def test_missing_energy(system):
    (system / "set.000" / "energy.npy").unlink()
    _expect_error(system, "has no energy.npy")


def test_shape_mismatches(system):
    s = system / "set.000"
    np.save(s / "force.npy", np.zeros((3, 15)))
    _expect_error(system, r"force\.npy: shape \(3, 15\) does not match 3 frames × 18 values")
    np.save(s / "force.npy", np.zeros((3, 18)))
    np.save(s / "energy.npy", np.zeros(2))
    _expect_error(system, r"energy\.npy: shape \(2,\)")
    np.save(s / "energy.npy", np.zeros(3))
    np.save(s / "box.npy", np.zeros((3, 6)))
    _expect_error(system, r"box\.npy: shape")
    np.save(s / "box.npy", np.tile(np.eye(3).ravel() * 9, (3, 1)))
    np.save(s / "coord.npy", np.zeros((4, 18)))
    _expect_error(system, r"shape \(3, 18\) does not match 4 frames")  # force now disagrees with coord
    (system / "type.raw").write_text("0 1 1 0 1\n")
    _expect_error(system, r"coord\.npy: shape \(4, 18\) does not match 4 frames × 15 values")


def test_corrupted_npy(system):
    data = (system / "set.000" / "coord.npy").read_bytes()
    (system / "set.000" / "coord.npy").write_bytes(data[: len(data) // 2])
    _expect_error(system, "not a readable .npy array")
    (system / "set.000" / "coord.npy").write_bytes(b"garbage")
    _expect_error(system, "not a readable .npy array")


def test_bad_folders(tmp_path, system):
    _expect_error(tmp_path / "none", "is not a folder")
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path / "empty", "has no type.raw")
    (system / "type.raw").write_text("0 a 1\n")
    err = _expect_error(system, "non-integer")
    assert err.path == str(system / "type.raw")
