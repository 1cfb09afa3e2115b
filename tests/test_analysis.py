"""Trajectory analysis against known answers: ideal gas and fcc RDFs, random-walk diffusion, harmonic spectra,
linear energy drift, AR(1) blocking errors; bad input; figures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from matplotlib.figure import Figure

from mlmd_lab import analysis
from mlmd_lab.analysis import plots
from mlmd_lab.errors import MLMDError

CU_A = 3.61


def make_frames(
    positions: np.ndarray,
    symbols: list[str] | str,
    cell: np.ndarray,
    dt_fs: float = 1.0,
    velocities: np.ndarray | None = None,
    time: bool = True,
) -> list[Atoms]:
    """Frames as mlmd_lab's MD writes them: info time_fs/step, momenta (from Å/fs velocities), periodic cell."""
    frames = []
    for step, pos in enumerate(positions):
        atoms = Atoms(symbols, positions=pos, cell=cell, pbc=True)
        v = np.zeros_like(pos) if velocities is None else velocities[step]
        atoms.set_velocities(v / units.fs)  # Å/fs → Å per ASE time unit
        atoms.info["step"] = step
        if time:
            atoms.info["time_fs"] = step * dt_fs
        frames.append(atoms)
    return frames


def md_like(atoms_list: list[Atoms], dt_fs: float = 1.0) -> list[Atoms]:
    for step, atoms in enumerate(atoms_list):
        atoms.info.update(step=step, time_fs=step * dt_fs)
        atoms.set_momenta(np.zeros((len(atoms), 3)))
    return atoms_list


# -------------------------------------------------------------------------------------------------------- RDF
def test_rdf_ideal_gas_is_one():
    rng = np.random.default_rng(1)
    cell = np.array([[20.0, 0.0, 0.0], [3.0, 20.0, 0.0], [2.0, 1.0, 20.0]])  # triclinic
    n, T = 400, 5
    positions = rng.random((T, n, 3)) @ cell
    frames = make_frames(positions, ["Ar"] * 200 + ["Ne"] * 200, cell)
    result = analysis.rdf(frames, r_max=8.0, bin_width=0.2)
    assert set(result.g) == {("Ar", "Ar"), ("Ar", "Ne"), ("Ne", "Ne")}
    assert result.r[0] == pytest.approx(0.1) and result.r[-1] == pytest.approx(7.9)
    far = result.r > 2.0
    for pair, g in result.g.items():
        assert abs(g[far].mean() - 1.0) < 0.02, pair
        assert np.max(np.abs(g[far] - 1.0)) < 0.3, pair
    # running coordination of an ideal gas: ρ_b 4/3 π r³ with ρ_b = (N_b − δ_ab) / V
    volume = abs(np.linalg.det(cell))
    assert result.coordination_number(("Ar", "Ar"), 8.0) == pytest.approx(199 / volume * 4 / 3 * np.pi * 8**3, rel=0.03)
    assert result.coordination_number(("Ar", "Ne"), 8.0) == pytest.approx(200 / volume * 4 / 3 * np.pi * 8**3, rel=0.03)
    # reversed pair: same g, coordination n_ba = n_ab N_a / N_b
    assert result.coordination_number(("Ne", "Ar"), 5.0) == pytest.approx(result.coordination_number(("Ar", "Ne"), 5.0))


@pytest.mark.parametrize("primitive", [False, True])
def test_rdf_fcc_copper_peak_and_coordination(primitive):
    if primitive:  # triclinic primitive cell: widths a/√3 × 6 = 12.5 Å
        crystal = bulk("Cu", "fcc", a=CU_A).repeat(6)
    else:
        crystal = bulk("Cu", "fcc", a=CU_A, cubic=True).repeat(4)
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(3):
        atoms = crystal.copy()
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)  # thermal rattle
        frames.append(atoms)
    result = analysis.rdf(md_like(frames), r_max=6.0, bin_width=0.02)
    assert list(result.g) == [("Cu", "Cu")]
    r_peak, g_peak = result.first_peak(("Cu", "Cu"))
    assert r_peak == pytest.approx(CU_A / np.sqrt(2), abs=0.03)
    assert g_peak > 10
    r_min, _ = result.first_minimum(("Cu", "Cu"))
    assert CU_A / np.sqrt(2) + 0.15 < r_min < CU_A - 0.15
    assert result.coordination_number(("Cu", "Cu")) == pytest.approx(12.0, abs=1e-9)
    assert result.coordination_number(("Cu", "Cu"), r_cut=3.9) == pytest.approx(18.0, abs=1e-9)  # + 6 at a


def test_rdf_bad_input():
    crystal = md_like([bulk("Cu", "fcc", a=CU_A, cubic=True).repeat(2)])  # 7.22 Å cube
    with pytest.raises(MLMDError, match=r"half the smallest perpendicular cell width \(3\.610 Å\)"):
        analysis.rdf(crystal, r_max=6.0)
    molecule = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    with pytest.raises(MLMDError, match="periodic"):
        analysis.rdf([molecule], r_max=2.0)
    with pytest.raises(MLMDError, match="at least 1 frame"):
        analysis.rdf([])
    with pytest.raises(MLMDError, match="not ase.Atoms"):
        analysis.rdf([np.zeros((3, 3))])
    with pytest.raises(MLMDError, match="0 O"):
        analysis.rdf(crystal, pairs=[("Cu", "O")], r_max=3.0)
    result = analysis.rdf(crystal, r_max=3.0)
    with pytest.raises(MLMDError, match="no g"):
        result.first_peak(("Cu", "O"))


# -------------------------------------------------------------------------------------------------------- MSD
def random_walk(n: int, T: int, sigma: float, seed: int, box: float = 30.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    start = rng.random((1, n, 3)) * box
    return start + np.concatenate([np.zeros((1, n, 3)), np.cumsum(rng.normal(scale=sigma, size=(T - 1, n, 3)), 0)])


def test_msd_random_walk_recovers_diffusion():
    dt, T = 2.0, 400
    sigma = {"Ar": 0.1, "He": 0.2}  # Å per step per direction → D = σ² / (2 Δt)
    walk = np.concatenate([random_walk(1000, T, sigma["Ar"], 3), random_walk(1000, T, sigma["He"], 4)], axis=1)
    frames = make_frames(walk, ["Ar"] * 1000 + ["He"] * 1000, np.eye(3) * 30.0, dt_fs=dt)
    result = analysis.msd(frames)
    assert result.time_fs[-1] == pytest.approx(dt * (T // 2))
    for element, s in sigma.items():
        D_true = s**2 / (2 * dt)
        D, err = result.diffusion(element)
        assert D == pytest.approx(D_true, rel=0.05), element
        assert 0 < err < 0.1 * D and abs(D - D_true) < 4 * err, (element, D, err, D_true)
        assert result.msd[element][1:] == pytest.approx(6 * D_true * result.time_fs[1:], rel=0.06)
        assert result.diffusion_cm2_s(element)[0] == pytest.approx(0.1 * D)
    assert result.msd["Ar"][0] == 0.0


def test_msd_wrapped_equals_unwrapped_and_timestep():
    cell = np.array([[12.0, 0.0, 0.0], [2.0, 12.0, 0.0], [0.0, 1.0, 12.0]])
    walk = random_walk(60, 120, 0.3, 5, box=12.0)
    unwrapped = make_frames(walk, "Ne60", cell, dt_fs=0.5)
    wrapped = make_frames(walk, "Ne60", cell, dt_fs=0.5, time=False)
    for atoms in wrapped:
        atoms.wrap()
    assert np.abs(wrapped[-1].positions - walk[-1]).max() > 6  # atoms really crossed the boundary
    a = analysis.msd(unwrapped, remove_com=False)
    b = analysis.msd(wrapped, timestep_fs=0.5, remove_com=False)
    assert not a.unwrapped and b.unwrapped
    np.testing.assert_allclose(b.time_fs, a.time_fs)
    np.testing.assert_allclose(b.msd["Ne"], a.msd["Ne"], rtol=1e-9, atol=1e-9)
    # direct (O(T²)) reference for the FFT algorithm
    lag = 7
    direct = np.mean(np.sum((walk[lag:] - walk[:-lag]) ** 2, axis=2))
    assert a.msd["Ne"][lag] == pytest.approx(direct, rel=1e-10)


def test_msd_removes_centre_of_mass_drift():
    walk = random_walk(50, 100, 0.05, 6)
    drift = np.arange(100)[:, None, None] * np.array([0.2, 0.0, 0.0])  # whole system flows at 0.2 Å/fs
    frames = make_frames(walk + drift, "Ar50", np.eye(3) * 30.0)
    still = analysis.msd(make_frames(walk, "Ar50", np.eye(3) * 30.0))
    np.testing.assert_allclose(analysis.msd(frames).msd["Ar"], still.msd["Ar"], rtol=1e-8, atol=1e-10)
    assert analysis.msd(frames, remove_com=False).msd["Ar"][-1] > 10 * still.msd["Ar"][-1]


def test_time_axis_errors():
    walk = random_walk(4, 6, 0.1, 7)
    frames = make_frames(walk, "Ar4", np.eye(3) * 30.0)
    with pytest.raises(MLMDError, match="at least 2 frame"):
        analysis.msd(frames[:1])
    gapped = frames[:3] + frames[4:]
    with pytest.raises(MLMDError, match="inconsistent time spacing.*frames 2 and 3"):
        analysis.msd(gapped)
    analysis.msd(gapped, timestep_fs=1.0)  # explicit spacing overrides time_fs
    no_time = make_frames(walk, "Ar4", np.eye(3) * 30.0, time=False)
    with pytest.raises(MLMDError, match=r"no atoms.info\['time_fs'\]: pass timestep_fs"):
        analysis.msd(no_time)
    with pytest.raises(MLMDError, match="has 3 atoms but frame 0 has 4"):
        analysis.msd(frames[:2] + [frames[2][:3]] + frames[3:])
    with pytest.raises(MLMDError, match="element 'Xe' is not in the frames"):
        analysis.msd(frames, elements=["Xe"])
    with pytest.raises(MLMDError, match="max_lag"):
        analysis.msd(frames, max_lag=10)
    with pytest.raises(MLMDError, match="timestep_fs"):
        analysis.vacf(frames, timestep_fs=-1.0)


# ---------------------------------------------------------------------------------------------------- VACF/VDOS
NU_H, NU_O = 100.0, 20.0  # THz: 3335.6 cm⁻¹ (O–H stretch region), 667.1 cm⁻¹


def harmonic_frames(dt: float = 0.5, T: int = 2000) -> list[Atoms]:
    """8 H oscillating at 100 THz and 8 O at 20 THz with random directions and phases."""
    rng = np.random.default_rng(8)
    t = np.arange(T)[:, None, None] * dt
    nu = np.array([NU_H] * 8 + [NU_O] * 8)[None, :, None] / 1000.0  # 1/fs
    direction = rng.normal(size=(1, 16, 3))
    direction /= np.linalg.norm(direction, axis=2, keepdims=True)
    phase = rng.random((1, 16, 1)) * 2 * np.pi
    velocities = 0.01 * direction * np.cos(2 * np.pi * nu * t + phase)  # Å/fs
    amplitude = 0.01 / (2 * np.pi * nu)
    positions = 5.0 + rng.random((1, 16, 3)) * 10 + direction * amplitude * np.sin(2 * np.pi * nu * t + phase)
    return make_frames(positions, ["H"] * 8 + ["O"] * 8, np.eye(3) * 20.0, dt_fs=dt, velocities=velocities)


def test_vacf_and_vdos_of_harmonic_oscillators():
    frames = harmonic_frames()
    result = analysis.vacf(frames)
    assert result.time_fs[1] == pytest.approx(0.5) and len(result.time_fs) == 1001
    lags = result.time_fs[:200]
    for element, nu in (("H", NU_H), ("O", NU_O)):
        np.testing.assert_allclose(result.c_norm[element][:200], np.cos(2 * np.pi * nu / 1000 * lags), atol=0.05)
        assert result.c[element][0] == pytest.approx(0.5 * 0.01**2, rel=0.05)  # ⟨v²⟩ = A²/2 (Å/fs)²
    weighted = analysis.vacf(frames, mass_weighted=True, elements=["H"])
    assert weighted.c["H"] == pytest.approx(result.c["H"] * frames[0].get_masses()[0], rel=1e-10)

    dos = analysis.vdos(result)
    assert dos.frequency_cm == pytest.approx(dos.frequency_thz * 33.35641)
    assert dos.band_maximum(2500, 4500, "H") == pytest.approx(NU_H * 33.35641, abs=5)
    assert dos.band_maximum(300, 1500, "O") == pytest.approx(NU_O * 33.35641, abs=5)
    assert dos.band_maximum(2500, 4500) == pytest.approx(NU_H * 33.35641, abs=5)
    df = np.diff(dos.frequency_thz)
    assert np.sum(0.5 * (dos.dos["H"][1:] + dos.dos["H"][:-1]) * df) == pytest.approx(1.0)
    assert np.sum(0.5 * (dos.total[1:] + dos.total[:-1]) * df) == pytest.approx(3 * 16)
    # hardly any H intensity in the O band and vice versa
    o_band = (dos.frequency_cm > 300) & (dos.frequency_cm < 1000)
    assert dos.dos["H"][o_band].max() < 0.01 * dos.dos["O"][o_band].max()
    # straight from frames, one element, no window
    direct = analysis.vdos(frames, elements=["H"], window=None)
    assert list(direct.dos) == ["H"]
    assert direct.band_maximum(2500, 4500) == pytest.approx(NU_H * 33.35641, abs=5)


def test_trajectory_file_round_trip(tmp_path):
    import ase.io

    frames = harmonic_frames(T=40)
    path = tmp_path / "md.traj"
    ase.io.write(path, frames)
    from_file = analysis.vacf(str(path))  # a path is read with ase.io.read(path, ":"), keeping time_fs and momenta
    np.testing.assert_allclose(from_file.time_fs, np.arange(21) * 0.5)
    np.testing.assert_allclose(from_file.c["H"], analysis.vacf(frames).c["H"], rtol=1e-10)
    with pytest.raises(MLMDError, match="cannot read trajectory"):
        analysis.msd(tmp_path / "missing.traj")


def test_vacf_needs_velocities():
    frames = harmonic_frames(T=10)
    for atoms in frames:
        del atoms.arrays["momenta"]
    with pytest.raises(MLMDError, match="frame 0 has no velocities"):
        analysis.vacf(frames)
    with pytest.raises(MLMDError, match="no velocities"):
        analysis.vdos(frames)
    with pytest.raises(MLMDError, match="unknown window"):
        analysis.vdos(analysis.vacf(harmonic_frames(T=10)), window="kaiser")


# ---------------------------------------------------------------------------------------------------- statistics
def test_energy_drift_recovers_slope():
    rng = np.random.default_rng(9)
    n_atoms, slope = 64, 0.5  # meV/atom/ps
    t_fs = np.arange(10001) * 1.0
    per_atom_meV = slope * t_fs / 1000 + rng.normal(scale=0.2, size=t_fs.size)
    energy_eV = -250.0 + per_atom_meV * n_atoms / 1000
    result = analysis.energy_drift(t_fs, energy_eV, n_atoms)
    analytic_err = 0.2 / np.sqrt(np.sum((t_fs / 1000 - 5.0) ** 2))
    assert result.slope_err_mev_atom_ps == pytest.approx(analytic_err, rel=0.2)
    assert abs(result.slope_mev_atom_ps - slope) < 4 * analytic_err
    assert result.rms_mev_atom == pytest.approx(0.2, rel=0.05)
    assert result.max_deviation_mev_atom > 5.0
    assert result.passes(1.0) and not result.passes(0.1)
    assert "meV/atom/ps" in str(result)
    with pytest.raises(MLMDError, match="one energy per time"):
        analysis.energy_drift(t_fs, energy_eV[:-1], n_atoms)
    with pytest.raises(MLMDError, match="not strictly increasing"):
        analysis.energy_drift(t_fs[::-1], energy_eV, n_atoms)
    with pytest.raises(MLMDError, match="n_atoms"):
        analysis.energy_drift(t_fs, energy_eV, 0)


def ar1(phi: float, n: int, seed: int) -> np.ndarray:
    from scipy.signal import lfilter

    noise = np.random.default_rng(seed).normal(size=n + 1000)
    return lfilter([1.0], [1.0, -phi], noise)[1000:]  # stationary: variance 1 / (1 − φ²)


def test_block_average_of_ar1_matches_analytic_error():
    phi, n = 0.9, 2**16
    x = 300.0 + ar1(phi, n, 10)
    g_true = (1 + phi) / (1 - phi)  # statistical inefficiency of AR(1)
    stderr_true = np.sqrt(g_true / (n * (1 - phi**2)))
    result = analysis.block_average(x)
    assert result.plateau
    assert result.mean == pytest.approx(300.0, abs=4 * stderr_true)
    assert result.stderr == pytest.approx(stderr_true, rel=0.15)
    assert result.statistical_inefficiency == pytest.approx(g_true, rel=0.3)
    assert result.n_independent == pytest.approx(n / result.statistical_inefficiency)
    assert np.std(x) / np.sqrt(n) < 0.3 * result.stderr  # the naive error would be far too small
    fixed = analysis.block_average(x, n_blocks=32)
    assert fixed.stderr == pytest.approx(stderr_true, rel=0.35)
    white = analysis.block_average(ar1(0.0, 4096, 11))
    assert white.stderr == pytest.approx(1 / 64, rel=0.15)
    with pytest.raises(MLMDError, match="at least 4"):
        analysis.block_average([1.0, 2.0])
    with pytest.raises(MLMDError, match="NaN"):
        analysis.block_average([1.0, 2.0, np.nan, 3.0, 4.0])
    with pytest.raises(MLMDError, match="1-D"):
        analysis.block_average(np.zeros((5, 2)))


# --------------------------------------------------------------------------------------------------------- plots
def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    return buffer.getvalue()


def _labels(fig: Figure) -> str:
    return " ".join(ax.get_xlabel() + " " + ax.get_ylabel() for ax in fig.axes)


def test_figures_render_with_units():
    crystal = md_like([bulk("Cu", "fcc", a=CU_A, cubic=True).repeat(3)])
    frames = harmonic_frames(T=200)
    t = np.arange(50) * 2.0
    drift = analysis.energy_drift(t, -10 + 1e-4 * t + 1e-4 * np.sin(t), 8)
    figures = {
        "rdf": plots.rdf_figure(analysis.rdf(crystal, r_max=5.0)),
        "msd": plots.msd_figure(analysis.msd(frames)),
        "vacf": plots.vacf_figure(analysis.vacf(frames)),
        "vdos": plots.vdos_figure(analysis.vdos(frames)),
        "thermo": plots.thermo_figure({"time_fs": t, "epot_eV": -12 + 0 * t, "ekin_eV": 2 + 0 * t,
                                       "etot_eV": -10 + 0 * t, "temperature_K": 300 + t, "custom": t,
                                       "pressure_GPa": np.full_like(t, np.nan)}),  # a molecule: no pressure
        "drift": plots.drift_figure(drift),
        "blocking": plots.blocking_figure(analysis.block_average(np.sin(t))),
    }
    units_expected = {"rdf": "(Å)", "msd": "(Å²)", "vacf": "(fs)", "vdos": "(cm⁻¹)", "thermo": "(K)",
                      "drift": "(meV/atom)", "blocking": "(samples)"}
    for name, fig in figures.items():
        assert isinstance(fig, Figure), name
        assert units_expected[name] in _labels(fig), (name, _labels(fig))
        assert _png(fig).startswith(b"\x89PNG"), name
    thermo = figures["thermo"]
    assert len(thermo.axes) == 3  # energies, temperature, custom (the all-NaN pressure gets no empty panel)
    assert "time (ps)" in _labels(thermo) and "E − E(t₀) (eV)" in _labels(thermo)
    assert "THz" in _labels(plots.vdos_figure(analysis.vdos(frames), unit="THz", total=False))
    with pytest.raises(MLMDError, match="no plottable columns"):
        plots.thermo_figure({"time_fs": t, "note": ["a"] * 50})
