"""mlmd_lab.autobuild (the main job's automatic construction) and mlmd_lab.analysis.phonons.

Fast: the symmetric finite-displacement force constants equal brute-force ones (EMT fcc Cu, a Lennard-Jones
diamond and rock salt: every atom displaced along x, y, z); the frequencies of fcc Cu's cubic cell; the plan's
learn keywords and the system choice. Slow, with real pw.x: :func:`run_autobuild` with a much smaller plan and
cheap DFT (Γ, 12 Ry; one training) writes its report, labels the held-out frames into the database after the loop (never
trained on: the loop's committees were trained before they existed), keeps the phonon DFT out of the database,
computes every check, and a rerun reuses everything (no new DFT call, the same figures).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones

from mlmd_lab import autobuild
from mlmd_lab.analysis import phonons
from mlmd_lab.errors import MLMDError


def _forces_with(calc):
    def forces_of(structures):
        out = []
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = calc
            out.append(atoms.get_forces())
        return out

    return forces_of


@pytest.mark.parametrize("atoms, calc, n_displacements", [
    (bulk("Cu", "fcc", a=3.6, cubic=True), EMT(), 2),
    (bulk("Si", "diamond", a=5.43, cubic=True), LennardJones(sigma=2.1, epsilon=1.0, rc=5.0), 2),
    (bulk("NaCl", "rocksalt", a=5.6, cubic=True), LennardJones(sigma=2.5, epsilon=0.1, rc=6.0), 4),
], ids=["Cu4-EMT", "Si8-LJ", "NaCl8-LJ"])
def test_symmetric_force_constants_equal_brute_force(atoms, calc, n_displacements):
    displaced = phonons.displacements(atoms, 0.01)
    assert len(displaced) == n_displacements  # one ± pair per set of equivalent atoms (cubic site symmetry)
    forces = _forces_with(calc)([d.atoms for d in displaced])
    symmetric = phonons.force_constants(atoms, displaced, forces)
    brute = phonons.brute_force_constants(atoms, _forces_with(calc), 0.01)  # 6N evaluations, no symmetry
    assert np.abs(symmetric - brute).max() < 1e-8 * np.abs(brute).max()


def test_fcc_cubic_cell_frequencies_are_gamma_and_x():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    displaced = phonons.displacements(atoms, 0.01)
    phi = phonons.force_constants(atoms, displaced, _forces_with(EMT())([d.atoms for d in displaced]))
    freqs = phonons.frequencies(atoms, phi)
    assert np.allclose(freqs[:3], 0.0, atol=1.0)  # acoustic at Γ (cm⁻¹)
    groups = phonons.degenerate_groups(freqs)
    assert [len(g) for g in groups] == [3, 6, 3]  # Γ acoustic; X: transverse (2 per X point), longitudinal
    assert freqs[-1] > freqs[3] > 50.0


def test_frequencies_in_subspaces_match_modes_not_order():
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    displaced = phonons.displacements(si, 0.01)

    def phi_of(calc):
        return phonons.force_constants(si, displaced, _forces_with(calc)([d.atoms for d in displaced]))

    reference = phi_of(LennardJones(sigma=2.1, epsilon=1.0, rc=5.0))
    other = phi_of(LennardJones(sigma=2.0, epsilon=1.3, rc=5.0))
    freqs, vectors = phonons.modes(si, reference)
    groups = phonons.degenerate_groups(freqs)
    same, leak = phonons.frequencies_in_subspaces(si, reference, vectors, groups)
    assert leak < 1e-10 and np.allclose(np.concatenate(same), freqs, atol=1e-3)  # cm⁻¹
    projected, leak = phonons.frequencies_in_subspaces(si, other, vectors, groups)
    assert leak < 1e-8  # the groups are symmetry subspaces: the other model's modes stay in them
    assert np.allclose(np.sort(np.concatenate(projected)), phonons.frequencies(si, other), atol=1e-3)


def test_displacements_refuse_a_molecule():
    from ase.build import molecule

    with pytest.raises(MLMDError, match="periodic"):
        phonons.displacements(molecule("H2O"))


def test_plan_keywords_and_system_choice():
    plan = autobuild.AutobuildSettings()
    keywords = plan.learn_keywords()
    assert keywords["temperatures"] == [300.0, 900.0] and keywords["reference_budget"] == plan.reference_budget
    assert keywords["train_config"]["max_epochs"] == plan.max_epochs and "trust" not in keywords
    assert plan.digest() == autobuild.AutobuildSettings().digest() != autobuild.AutobuildSettings(seed=1).digest()
    pyscf = autobuild.choose_system("pyscf")
    assert pyscf.atoms.get_chemical_formula() == "C8" and type(pyscf.recipe).__name__ == "PySCF"
    if autobuild.qe_available():
        qe = autobuild.choose_system("auto")
        assert qe.atoms.get_chemical_formula() == "Si8" and type(qe.recipe).__name__ == "QuantumEspresso"
        assert qe.recipe.kpts == [2, 2, 2] and qe.recipe.smearing is None  # a semiconductor
    with pytest.raises(MLMDError, match="engine"):
        autobuild.choose_system("vasp")


@pytest.mark.slow
@pytest.mark.skipif(not autobuild.qe_available(),
                    reason="Quantum ESPRESSO pw.x and quantum-espresso-data not installed (scripts/apt-packages.txt)")
def test_autobuild_with_real_qe_writes_the_report_and_computes_the_checks(db, tmp_path):
    from mlmd_lab.dft import QuantumEspresso
    from mlmd_lab.dft.label import LEDGER

    # cheap DFT (Γ with smearing, 12 Ry: ~1-4 s per Si8 here) and a tiny plan: a 6-structure seed set (the
    # budget), one training and exploration, then "reference budget"; 2 held-out frames, 2 phonon runs
    recipe = QuantumEspresso(pseudopotentials={"Si": autobuild.SI_PSEUDOPOTENTIAL}, ecutwfc_ry=12.0, kpts=(1, 1, 1),
                             smearing=("mv", 0.02))
    system = autobuild.System("Si8 test", autobuild.diamond_cell("Si"), recipe, "test: cheap QE")
    plan = autobuild.AutobuildSettings(committee=2, max_iterations=1, per_iteration=2, reference_budget=6,
                                       md_steps=60, hidden=(6, 6), max_epochs=100, n_holdout=2,
                                       holdout_spacing_steps=20)
    lines: list[str] = []
    result = autobuild.run_autobuild(db, plan, tmp_path / "ab", system=system, log=lines.append)

    assert result.report_path == tmp_path / "ab" / "report.html"
    html = result.report_path.read_text()
    assert "Held-out DFT frames" in html and "Phonons" in html and html.count("data:image/png;base64,") >= 3
    calls = result.learn.n_reference_calls
    assert result.learn.stop_reason == "reference budget" and calls == 6  # the seed set spent it all
    assert "did NOT stop by itself" in html and "reference budget" in html  # not converged: said as it is

    # held-out frames: labelled after the loop, into the database, tagged; the committee trained on the loop's only
    assert result.holdout["n_frames"] == 2 and len(result.holdout_frames) == 2
    tagged = db.frames(tags=[autobuild.HOLDOUT_TAG])
    assert len(tagged) == 2
    assert result.learn.iterations[-1].train_frames == calls == db.count(elements=["Si"]) - 2
    assert all(np.isfinite(result.holdout[k]) for k in ("energy_rmse_mev", "force_rmse_mev", "force_share"))
    # phonons: 2 DFT runs (one ± pair), outside the database; 24 modes, 3 acoustic
    assert result.phonons["displacements"] == 2 and len(result.phonons["dft_cm1"]) == 24
    assert db.mongo[LEDGER].count_documents({}) == calls + 2  # loop and held-out, no phonon task
    assert np.sum(np.abs(result.phonons["dft_cm1"]) < 5.0) >= 3  # translations (Γ-only 12 Ry Si8 is unstable)
    assert len(result.checks) == 4 and all(isinstance(ok, bool) for ok, _ in result.checks)
    assert set(result.timings_s) == {"learn", "holdout_dft", "holdout_errors", "phonons", "report"}
    summary = json.loads((tmp_path / "ab" / "summary.json").read_text())
    assert summary["learn"]["stop_reason"] == "reference budget" and len(summary["checks"]) == 4

    # a rerun: the loop's workdir answers, the ledger and the phonon folders too; no DFT runs, same figures
    calls_before = db.mongo[LEDGER].count_documents({})
    again = autobuild.run_autobuild(db, plan, tmp_path / "ab", system=system, log=lines.append, report=False)
    assert db.mongo[LEDGER].count_documents({}) == calls_before and db.count(elements=["Si"]) == calls + 2
    assert again.holdout["force_rmse_mev"] == pytest.approx(result.holdout["force_rmse_mev"], rel=1e-9)
    assert np.allclose(again.phonons["dft_cm1"], result.phonons["dft_cm1"])
    assert any("held-out" in line for line in lines) and Path(result.learn.workdir).is_dir()


def test_dft_failure_check_allows_a_share_of_unconverged_scfs_and_no_other_failure():
    """Ledger errors as label() writes them ("Type: message"): unconverged SCFs up to the share pass, anything
    else (a crash) fails at once, and the sentence says which."""
    from mlmd_lab.autobuild import dft_failure_check

    scf = ["k1", "SCFNotConvergedError: pw.x's SCF did not converge in /x (2 runs, ...)"]
    crash = ["k2", "MLMDError: pw.x failed in /y (CalledProcessError: ...); its last words: Error in routine cdiaghg"]
    assert dft_failure_check([], 0) == (True, dft_failure_check([], 0)[1])
    ok, text = dft_failure_check([scf], 10)
    assert ok and "0 of 10 failed" in text and "1 SCF did not converge" in text and "k1" in text
    assert not dft_failure_check([scf, scf], 10)[0]  # 2 of 10 > 10 %
    assert dft_failure_check([scf, scf], 10, max_unconverged_share=0.2)[0]
    ok, text = dft_failure_check([crash], 100)
    assert not ok and "1 of 100 failed" in text and "cdiaghg" in text
    assert not dft_failure_check([scf, crash], 100)[0]
