"""extxyz reader/writer: results and metadata round trips, ASE variants, bad input, cross-format."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms

from mlmd_lab.errors import InputFileError, MLMDError
from mlmd_lab.frames import labelled_atoms, results_of
from mlmd_lab.io.deepmd import read_deepmd, write_deepmd
from mlmd_lab.io.extxyz import read_extxyz, write_extxyz
from mlmd_lab.io.n2p2 import read_input_data, write_input_data

EXTERNAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "external"
WATER = EXTERNAL / "deepmd-water"


def _frames(n: int = 3, seed: int = 2) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append(
            labelled_atoms(
                ["Cu", "S", "S"],
                rng.normal(size=(3, 3)) * 2,
                cell=np.array([[6.0, 0.1, 0.0], [0.0, 6.5, 0.2], [-1.0, 0.0, 7.0]]),
                pbc=True,
                energy=float(rng.normal() * 10) + 0.1,
                free_energy=float(rng.normal()),
                forces=rng.normal(size=(3, 3)) / 3,
                stress=rng.normal(size=6) / 7,
                info={
                    "step": i,
                    "frame_id": f"f{i:04d}",
                    "calc_id": "abc123",
                    "source": "/data/run 1/vasprun.xml",
                    "tags": ["train", "md 300K"],
                    "signature": {
                        "code": "vasp",
                        "ENCUT": 520.0,
                        "GGA": "PE",
                        "kpts": [3, 3, 3],
                        "odd": 'quote " and \\ backslash',
                    },
                    "weight": 0.5,
                    "flag": True,
                    "number_string": "42",
                },
            )
        )
    return out


def _assert_same(a: Atoms, b: Atoms, rtol: float = 0.0) -> None:
    ra, rb = results_of(a), results_of(b)
    assert b.get_chemical_symbols() == a.get_chemical_symbols()
    np.testing.assert_allclose(b.positions, a.positions, rtol=rtol, atol=0)
    np.testing.assert_allclose(b.cell.array, a.cell.array, rtol=rtol, atol=0)
    assert list(b.pbc) == list(a.pbc)
    for key in ("energy", "free_energy", "forces", "stress"):
        if key in ra:
            np.testing.assert_allclose(rb[key], ra[key], rtol=rtol, atol=0, err_msg=key)


def test_round_trip_results_and_metadata(tmp_path):
    frames = _frames()
    out = tmp_path / "data.xyz"
    assert write_extxyz(out, frames) == 3
    back = read_extxyz(out)
    assert len(back) == 3
    for a, b in zip(frames, back, strict=True):
        _assert_same(a, b)
        assert b.info == a.info
        assert isinstance(b.info["step"], int) and isinstance(b.info["weight"], float)
        json.dumps(b.info)  # plain Python types only


def test_written_file_is_plain_ase_extxyz(tmp_path):
    frames = _frames(2)
    out = tmp_path / "data.xyz"
    write_extxyz(out, frames)
    images = ase.io.read(out, ":", format="extxyz")
    assert len(images) == 2
    res = images[0].calc.results
    assert res["energy"] == frames[0].get_potential_energy()
    np.testing.assert_array_equal(res["forces"], frames[0].get_forces())
    np.testing.assert_allclose(res["stress"], frames[0].get_stress(), rtol=0, atol=0)
    assert json.loads(images[0].info["signature_json"] if "signature_json" in images[0].info else "{}") or (
        "signature_json_b64" in images[0].info
    )
    assert images[0].info["frame_id"] == "f0000"


def test_signature_json_key_when_simple(tmp_path):
    frame = _frames(1)[0]
    frame.info["signature"] = {"code": "qe", "ecutwfc": 60}
    write_extxyz(tmp_path / "a.xyz", [frame])
    raw = ase.io.read(tmp_path / "a.xyz", format="extxyz")
    assert json.loads(raw.info["signature_json"]) == {"code": "qe", "ecutwfc": 60}
    assert read_extxyz(tmp_path / "a.xyz")[0].info["signature"] == {"code": "qe", "ecutwfc": 60}


def test_initial_charges_and_nonperiodic(tmp_path):
    mol = labelled_atoms(
        ["O", "H", "H"], [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], energy=-14.2, forces=np.eye(3) * 0.1
    )
    mol.set_initial_charges([-0.8, 0.4, 0.4])
    write_extxyz(tmp_path / "m.xyz", [mol])
    back = read_extxyz(tmp_path / "m.xyz")[0]
    assert not back.pbc.any()
    np.testing.assert_array_equal(back.get_initial_charges(), [-0.8, 0.4, 0.4])
    assert back.get_potential_energy() == -14.2
    np.testing.assert_array_equal(back.get_forces(), np.eye(3) * 0.1)
    assert back.info["step"] == 0


def test_reads_ase_written_and_prefixed_keys(tmp_path):
    frames = _frames(2)
    for a in frames:  # ASE cannot read back its own JSON of strings with backslashes
        a.info["signature"].pop("odd")
    out = tmp_path / "ase.xyz"
    ase.io.write(out, frames, format="extxyz")
    back = read_extxyz(out)
    for a, b in zip(frames, back, strict=True):
        _assert_same(a, b, rtol=1e-7)
    text = (
        "2\n"
        'Lattice="5.0 0.0 0.0 0.0 5.0 0.0 0.0 0.0 5.0" Properties=species:S:1:pos:R:3:REF_forces:R:3 '
        'REF_energy=-3.5 REF_virial="1.0 0.0 0.0 0.0 2.0 0.0 0.0 0.0 3.0" config_type=bulk pbc="T T T"\n'
        "H 0.0 0.0 0.0 0.1 0.2 0.3\n"
        "H 0.7 0.0 0.0 -0.1 -0.2 -0.3\n"
    )
    (tmp_path / "ref.xyz").write_text(text)
    frame = read_extxyz(tmp_path / "ref.xyz")[0]
    assert frame.get_potential_energy() == -3.5
    np.testing.assert_array_equal(frame.get_forces()[0], [0.1, 0.2, 0.3])
    np.testing.assert_allclose(frame.get_stress(), -np.array([1.0, 2.0, 3.0, 0, 0, 0]) / 125.0)
    assert frame.info["config_type"] == "bulk"
    assert "REF_energy" not in frame.info


def test_index_selection(tmp_path):
    frames = _frames(5)
    write_extxyz(tmp_path / "d.xyz", frames)
    assert [a.info["frame_id"] for a in read_extxyz(tmp_path / "d.xyz", "1:4:2")] == ["f0001", "f0003"]
    assert [a.info["frame_id"] for a in read_extxyz(tmp_path / "d.xyz", -1)] == ["f0004"]
    assert len(read_extxyz(tmp_path / "d.xyz", slice(0, 2))) == 2
    with pytest.raises(InputFileError, match="out of range"):
        read_extxyz(tmp_path / "d.xyz", 9)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"2\nProperties=species:S:1:pos:R:3 energy=1.0\nH 0 0 0\nH \xff\xfe 0 0\n", "not UTF-8"),
        (b"3\nProperties=species:S:1:pos:R:3 energy=1.0\nH 0 0 0\nH 1 0 0\n", "malformed extxyz"),
        (b"2\nProperties=species:S:1:pos:R:3 energy=1.0\nH 0 0 0\nH 1 zero 0\n", "malformed extxyz"),
        (b'2\nProperties=species:S:1:pos:R:3 pbc="F F F"\nH 0 0 0\nH 1 0 0\n', "frame 0 has no energy"),
        (b"", "no frames"),
    ],
)
def test_bad_input(tmp_path, content, match):
    path = tmp_path / "bad.xyz"
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=match) as err:
        read_extxyz(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="cannot open"):
        read_extxyz(tmp_path / "nope.xyz")


def test_cross_format_deepmd_n2p2_extxyz(tmp_path):
    folder = WATER / "data_0"
    if not folder.exists():
        pytest.skip(f"shared test data not found: {folder}")
    original = read_deepmd(folder)[:5]
    write_deepmd(tmp_path / "dp", original)
    from_dp = read_deepmd(tmp_path / "dp")
    write_input_data(tmp_path / "input.data", from_dp, "Ha", "Bohr")
    from_n2p2 = read_input_data(tmp_path / "input.data", "Ha", "Bohr")
    write_extxyz(tmp_path / "all.xyz", from_n2p2)
    final = read_extxyz(tmp_path / "all.xyz")
    assert len(final) == 5
    for a, b in zip(original, final, strict=True):
        _assert_same(a, b, rtol=1e-14)
        assert b.info["step"] == a.info["step"]


# -- label spellings (issue 20.5): recognised, or refused naming the column --------------------------------
def _emt_frames(n: int = 3):
    from ase.build import bulk
    from ase.calculators.emt import EMT

    frames = []
    for seed in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=seed)
        atoms.calc = EMT()
        frames.append(labelled_atoms(atoms.get_chemical_symbols(), atoms.positions, atoms.cell.array, True,
                                     energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                                     stress=atoms.get_stress()))
    return frames


def _xyz(frames, energy="energy", forces="forces", stress=None, virial=None, extra_forces=None) -> str:
    """extxyz text with the labels under the given names (as other programs write them); ``extra_forces``:
    {name: (N, 3) array per frame} of further per-atom columns."""
    out = []
    for k, a in enumerate(frames):
        cols = [("species", "S", 1), ("pos", "R", 3)] + ([(forces, "R", 3)] if forces else [])
        extra = {name: arrays[k] for name, arrays in (extra_forces or {}).items()}
        cols += [(name, "R", 3) for name in extra]
        head = [f'Lattice="{" ".join(repr(float(v)) for v in a.cell.array.ravel())}"',
                "Properties=" + ":".join(f"{n}:{t}:{c}" for n, t, c in cols)]
        if energy:
            head.append(f"{energy}={a.get_potential_energy()!r}")
        s = a.get_stress(voigt=False)
        if stress:
            head.append(f'{stress}="{" ".join(repr(float(v)) for v in s.ravel())}"')
        if virial:
            head.append(f'{virial}="{" ".join(repr(float(v)) for v in (-s * a.get_volume()).ravel())}"')
        head.append('pbc="T T T"')
        out += [str(len(a)), " ".join(head)]
        for i, (sym, p) in enumerate(zip(a.get_chemical_symbols(), a.positions, strict=True)):
            row = [sym, *map(repr, map(float, p))]
            if forces:
                row += map(repr, map(float, a.get_forces()[i]))
            for arr in extra.values():
                row += map(repr, map(float, arr[i]))
            out.append(" ".join(row))
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("forces", ["forces", "force", "Force", "dft_force", "DFT_forces", "REF_forces", "F"])
@pytest.mark.parametrize("energy", ["energy", "Energy", "dft_energy", "REF_energy", "TotEnergy", "total_energy",
                                    "E", "free_energy"])
def test_common_label_spellings_are_read(tmp_path, forces, energy):
    frames = _emt_frames(2)
    path = tmp_path / "data.xyz"
    path.write_text(_xyz(frames, energy=energy, forces=forces))
    back = read_extxyz(path)
    for a, b in zip(frames, back, strict=True):
        assert b.get_potential_energy() == a.get_potential_energy()
        np.testing.assert_array_equal(b.get_forces(), a.get_forces())
        assert forces not in b.arrays and energy not in b.info  # the label column is not kept twice


@pytest.mark.parametrize("stress,virial", [("stress", None), ("dft_stress", None), (None, "virial"),
                                           (None, "dft_virial"), (None, "REF_virials"), ("stress", "virial")])
def test_stress_and_virial_spellings(tmp_path, stress, virial):
    frames = _emt_frames(2)
    path = tmp_path / "data.xyz"
    path.write_text(_xyz(frames, forces="force", stress=stress, virial=virial))
    for a, b in zip(frames, read_extxyz(path), strict=True):
        np.testing.assert_allclose(b.get_stress(), a.get_stress(), rtol=1e-12, atol=1e-15)


def test_two_differing_force_columns_are_refused_naming_both_and_keys_chooses(tmp_path):
    frames = _emt_frames(2)
    predicted = [a.get_forces() + 0.01 for a in frames]  # e.g. a model's forces written beside the reference
    path = tmp_path / "data.xyz"
    path.write_text(_xyz(frames, forces="REF_forces", extra_forces={"force": predicted}))
    with pytest.raises(InputFileError, match=r"frame 0 has two forces columns with different values, "
                                             r"REF_forces and force .*keys=\{'forces': 'REF_forces'\}") as err:
        read_extxyz(path)
    assert str(path) in str(err.value)
    chosen = read_extxyz(path, keys={"forces": "REF_forces"})
    np.testing.assert_array_equal(chosen[1].get_forces(), frames[1].get_forces())
    other = read_extxyz(path, keys={"forces": "force"})
    np.testing.assert_array_equal(other[1].get_forces(), predicted[1])
    with pytest.raises(InputFileError, match=r"no column or key 'dft_forces'.*'REF_forces'"):
        read_extxyz(path, keys={"forces": "dft_forces"})
    with pytest.raises(MLMDError, match="unknown label"):
        read_extxyz(path, keys={"force": "REF_forces"})


def test_equal_duplicate_columns_are_accepted(tmp_path):
    frames = _emt_frames(2)
    path = tmp_path / "data.xyz"
    path.write_text(_xyz(frames, forces="forces", extra_forces={"dft_force": [a.get_forces() for a in frames]}))
    back = read_extxyz(path)
    np.testing.assert_array_equal(back[0].get_forces(), frames[0].get_forces())
    assert "dft_force" not in back[0].arrays


def test_stress_and_virial_that_disagree_are_refused(tmp_path):
    frame = _emt_frames(1)[0]
    virial = -1.1 * frame.get_stress(voigt=False) * frame.get_volume()  # 10 % off the stress column
    text = _xyz([frame], stress="stress").replace(
        'pbc="T T T"', 'virial="' + " ".join(repr(float(v)) for v in virial.ravel()) + '" pbc="T T T"')
    path = tmp_path / "data.xyz"
    path.write_text(text)
    with pytest.raises(InputFileError, match="two stress columns with different values, stress and virial"):
        read_extxyz(path)
    np.testing.assert_allclose(read_extxyz(path, keys={"virial": "virial"})[0].get_stress(),
                               1.1 * frame.get_stress(), rtol=1e-12)


def test_force_column_of_wrong_shape_is_named(tmp_path):
    text = ("2\nProperties=species:S:1:pos:R:3:force:R:1 energy=-1.5 pbc=\"F F F\"\n"
            "H 0 0 0 0.1\nH 0.7 0 0 -0.1\n")
    path = tmp_path / "data.xyz"
    path.write_text(text)
    with pytest.raises(InputFileError, match=r"column force has shape \(2,\).*forces need \(2, 3\)"):
        read_extxyz(path)
