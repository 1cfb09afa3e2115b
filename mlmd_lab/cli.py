"""``mlmd-lab`` command line: the same functions as the notebook API.

Expected failures print one line (``mlmd-lab: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mlmd_lab import cli_access
from mlmd_lab.errors import MLMDError

QUERY_KEYS = ("elements", "exclusive", "formula", "tags", "limit")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MLMDError as err:
        print(f"mlmd-lab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlmd-lab: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlmd-lab", description=__doc__.splitlines()[0])
    p.add_argument("--uri", help="MongoDB URI (default: $MLMD_MONGODB_URI, else the embedded server)")
    p.add_argument("--database", default="mlmd", help="database name (default: mlmd)")
    p.add_argument("--data-dir", help="embedded server folder (default: $MLMD_DATA_DIR or the user data folder)")
    sub = p.add_subparsers(title="commands")

    demo = sub.add_parser("demo", help="the main job: ingest the sample runs, show what the database holds, build a "
                                       "potential for a solid automatically with real DFT, check it against DFT and "
                                       "write its HTML report (autobuild/report.html)")
    demo.add_argument("--samples", help="folder of sample data (default: ../shared/external, else a bundled example)")
    demo.add_argument("--autobuild-workdir", default="autobuild",
                      help="automatic construction's state, DFT folders and report.html (default: autobuild)")
    demo.add_argument("--engine", choices=("auto", "qe", "pyscf"), default="auto",
                      help="DFT of the automatic construction (auto: Quantum ESPRESSO when pw.x is installed)")
    demo.add_argument("--no-autobuild", action="store_true", help="skip the automatic construction")
    demo.add_argument("--quickstart", action="store_true",
                      help="also run the water quickstart (PySCF -> training -> MD -> analysis, 2-5 min)")
    demo.add_argument("--workdir", default="quickstart",
                      help="quickstart outputs and report.html (default: quickstart)")
    demo.add_argument("--no-quickstart", action="store_true", help=argparse.SUPPRESS)  # the default now
    demo.set_defaults(func=cmd_demo)

    lab = sub.add_parser("lab", help="open JupyterLab on the tutorial notebooks (embedded database started first)")
    lab.add_argument("--notebooks", help="folder to open (default: the source tree's notebooks/, else the cwd)")
    lab.add_argument("--port", type=int, default=8888)
    lab.add_argument("--ip", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    lab.add_argument("--no-browser", action="store_true")
    lab.set_defaults(func=cmd_lab)

    ing = sub.add_parser("ingest", help="ingest every recognised run file below PATH")
    ing.add_argument("paths", nargs="+", metavar="PATH")
    ing.add_argument("--units", help="energy,length units of unit-less formats (n2p2), e.g. Ha,Bohr")
    ing.add_argument("--settings", nargs="*", default=[], metavar="KEY=VALUE",
                     help="settings to declare for data without run settings, e.g. code=cp2k xc=SCAN")
    ing.add_argument("--tags", nargs="*", default=[])
    ing.add_argument("--keys", nargs="*", default=[], metavar="LABEL=COLUMN",
                     help="extxyz: which column holds a label where a file has two, e.g. forces=REF_forces")
    ing.add_argument("--last-only", action="store_true", help="keep only the last ionic step of each run")
    ing.add_argument("--allow-unfinished", action="store_true", help="keep complete steps of unfinished runs")
    ing.add_argument("--workers", type=int, help="parser processes (default: automatic)")
    ing.add_argument("--no-progress", action="store_true")
    cli_access.add_ingest_options(ing)
    ing.set_defaults(func=cmd_ingest)

    q = sub.add_parser("query", help="find frames and summarise or export them")
    _query_args(q)
    q.add_argument("--export", metavar="FILE", help="write the frames (format from --format)")
    q.add_argument("--format", choices=("extxyz", "n2p2", "deepmd"), default="extxyz")
    q.add_argument("--export-units", default="eV,Angstrom", help="units of an n2p2 export (default eV,Angstrom)")
    q.set_defaults(func=cmd_query)

    sub.add_parser("summary", help="what the database holds").set_defaults(func=cmd_summary)

    comp = sub.add_parser("compatible", help="can two data sets be mixed? (each a query: key=value ...)")
    comp.add_argument("--a", nargs="+", required=True, metavar="KEY=VALUE")
    comp.add_argument("--b", nargs="+", required=True, metavar="KEY=VALUE")
    comp.set_defaults(func=cmd_compatible)

    tr = sub.add_parser("train", help="train a potential on database frames and save it in the potential database")
    tr.add_argument("--elements", nargs="+", required=True, help="element symbols (frames of any subset are used)")
    tr.add_argument("--name", required=True, help="name to save the potential under (versions accumulate)")
    tr.add_argument("--formula", help="only frames of this reduced formula, e.g. H2O")
    tr.add_argument("--settings", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. code=vasp xc=PBE")
    tr.add_argument("--tags", nargs="*")
    tr.add_argument("--epochs", type=int, help="epochs (default: planned from the time limit or the data size)")
    tr.add_argument("--time-limit", type=float,
                    help="seconds for the whole run (features, training, final errors); the epochs fill it")
    tr.add_argument("--ensemble", type=int, default=1, metavar="N", help="train a committee of N members")
    tr.add_argument("--workdir", help="checkpoints and metrics log (a killed run resumes from here)")
    tr.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                    help="other TrainingConfig fields, e.g. learning_rate=0.001 seed=3")
    tr.add_argument("--description", default="")
    tr.set_defaults(func=cmd_train)

    _models_args(sub)
    _md_args(sub)
    _slhmc_args(sub)
    _label_args(sub)
    _learn_args(sub)

    srv = sub.add_parser("server", help="embedded database server: start (keep running), stop, status")
    srv.add_argument("action", choices=("start", "stop", "status"))
    cli_access.add_server_options(srv)
    srv.set_defaults(func=cmd_server)
    cli_access.add_parsers(sub)
    return p


def _label_args(sub) -> None:
    lb = sub.add_parser("label", help="label structures with DFT (QE, VASP, PySCF; or ASE's EMT, for trying) on a "
                                      "cluster, into the database")
    lb.add_argument("--structures", required=True, help="structures, any ASE-readable file")
    lb.add_argument("--index", default=":", help="frames of the file (default: all)")
    lb.add_argument("--rattle", type=int, metavar="N", help="label N rattled copies of each structure instead")
    lb.add_argument("--amplitude", type=float, default=0.05, help="rattle amplitude in Å (default 0.05)")
    lb.add_argument("--recipe", default="qe", choices=("qe", "pyscf", "vasp", "emt"),
                    help="qe, pyscf, vasp, or emt (ASE's EMT calculator for Al Cu Ag Au Ni Pd Pt (H C N O): tutorials)")
    lb.add_argument("--option", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe settings, e.g. ecutwfc_ry=30 kspacing=0.3 pseudopotentials.Si=Si.pbe-rrkj.UPF")
    lb.add_argument("--cluster", default=None,
                    help="local, slurm, pbs, sge or pjm (default: run here, or the profile's kind)")
    lb.add_argument("--profile", help="cluster profile of the clusters config file")
    lb.add_argument("--jobs", type=int, default=1, help="workers (local) or batch jobs to start (default 1)")
    lb.add_argument("--workdir", default="labelling", help="folder of the calculation folders")
    lb.add_argument("--retries", type=int, default=2)
    lb.add_argument("--tags", nargs="*", default=[])
    lb.set_defaults(func=cmd_label)


def cmd_label(args: argparse.Namespace) -> int:
    from mlmd_lab.dft import generators
    from mlmd_lab.dft.label import label

    structures = _read_structures(args.structures, args.index)
    if args.rattle:
        structures = [r for a in structures for r in generators.rattle(a, args.rattle, amplitude=args.amplitude)]
    recipe = _recipe(args.recipe, args.option)
    if args.recipe == "emt":
        _check_emt_elements(structures)
    db = _connect(args)
    cluster = None
    if args.cluster or args.profile:
        from mlmd_lab.cluster import cluster as make_cluster

        kind = args.cluster
        cluster = make_cluster(kind, args.profile, **({"n_workers": args.jobs} if kind == "local" else {}))
        if kind != "local":
            cluster.scale(jobs=args.jobs)
    try:
        report = label(structures, recipe, cluster=cluster, db=db, workdir=args.workdir, retries=args.retries,
                       tags=args.tags, progress=sys.stderr.isatty())
    finally:
        if cluster is not None:
            cluster.close()
    print(report)
    return 1 if report.failed else 0


def _recipe(name: str, options: list[str]):
    """The recipe ``name`` (qe, pyscf, vasp; emt: ASE's EMT as a CalculatorRecipe) with ``KEY=VALUE`` options."""
    from mlmd_lab.dft import CalculatorRecipe, PySCF, QuantumEspresso, Vasp

    kwargs: dict[str, Any] = {}
    for key, parsed in parse_pairs(options).items():
        if isinstance(parsed, str) and "," in parsed:  # kpts=2,2,2 or smearing=mv,0.01
            parsed = [parse_value(part) for part in parsed.split(",")]
        if "." in key:  # nested mapping, e.g. pseudopotentials.Si=Si.pbe-rrkj.UPF
            outer, inner = key.split(".", 1)
            kwargs.setdefault(outer, {})[inner] = parsed
        else:
            kwargs[key] = parsed
    if name == "emt":
        from ase.calculators.emt import EMT

        unknown = sorted(set(kwargs) - set(EMT.default_parameters))
        if unknown:
            raise MLMDError(f"bad --option for the emt recipe: {', '.join(unknown)}; EMT takes "
                            f"{', '.join(EMT.default_parameters) or 'no options'}")
        return CalculatorRecipe(EMT(**kwargs))
    cls = {"qe": QuantumEspresso, "pyscf": PySCF, "vasp": Vasp}[name]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise MLMDError(f"bad --option for the {name} recipe: {err}") from err


def _check_emt_elements(structures: list) -> None:
    """Refuse structures with elements ASE's EMT has no parameters for (every calculation would fail)."""
    from ase.calculators.emt import parameters

    missing = sorted({s for atoms in structures for s in atoms.get_chemical_symbols()} - set(parameters))
    if missing:
        raise MLMDError(f"ASE's EMT has no parameters for {', '.join(missing)} (only {' '.join(sorted(parameters))}); "
                        "use a DFT reference (qe, vasp or pyscf) for these elements")


def _read_structures(path: str, index: str) -> list:
    from ase.io import read

    if not Path(path).exists():
        raise MLMDError(f"structure file {path} does not exist; give the path of a structure file in a format ASE "
                        "reads (extxyz, POSCAR, .traj, cif, ...)")
    try:
        out = read(path, index=index)
    except Exception as err:  # ASE raises many kinds for unreadable files
        raise MLMDError(f"ASE cannot read {path} ({type(err).__name__}: {err}); give a file in a format ASE reads "
                        "(extxyz, POSCAR, .traj, cif, ...)") from err
    return out if isinstance(out, list) else [out]


def _md_args(sub) -> None:
    md = sub.add_parser("md", help="molecular dynamics with a saved or n2p2-format potential (ASE-readable structure)")
    source = md.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="name of a potential in the potential database")
    source.add_argument("--n2p2", metavar="FOLDER", help="folder with input.nn, scaling.data, weights.NNN.data")
    md.add_argument("--version", type=int, help="model version (default: latest)")
    md.add_argument("--units", help="n2p2 potential's energy,length units, e.g. Ha,Bohr (n2p2 files carry none; "
                    "default: as input.nn's comments state, else inferred from input.data beside it, else an error)")
    md.add_argument("--energy-unit", help="n2p2 potential's energy unit (e.g. Ha), with --length-unit")
    md.add_argument("--length-unit", help="n2p2 potential's length unit (e.g. Bohr), with --energy-unit")
    md.add_argument("--structure", help="starting structure, any ASE-readable file (not needed with --resume)")
    md.add_argument("--index", default="-1", help="frame of the structure file (default: the last)")
    md.add_argument("--repeat", type=int, nargs=3, metavar=("NA", "NB", "NC"), help="supercell of the structure")
    md.add_argument("--ensemble", default="nve", help="nve, nvt (Langevin), nose-hoover or npt")
    md.add_argument("--temperature", type=float, help="K")
    md.add_argument("--pressure", type=float, help="GPa (NPT)")
    md.add_argument("--barostat", default="isotropic", choices=("isotropic", "anisotropic"))
    md.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    md.add_argument("--steps", type=int, help="steps (default 1000; with --resume: the rest of the original run)")
    md.add_argument("--workdir", required=True, help="folder for md.traj, md.log, restart.npz")
    md.add_argument("--resume", action="store_true", help="continue the run in --workdir from its restart file")
    md.add_argument("--skin", type=float, help="neighbour-list skin in Å (default 0.5)")
    md.add_argument("--dtype", choices=("float64", "float32"))
    md.add_argument("--neighbours", default="auto", choices=("auto", "host", "device"),
                    help="where neighbour lists are rebuilt (auto: on the device on a GPU, else on the host)")
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--interval", type=int, default=10, help="steps between log rows and trajectory frames")
    md.add_argument("--on-extrapolation", default="warn", choices=("warn", "stop", "ignore"))
    md.add_argument("--max-force-spread", type=float, help="stop above this calibrated committee force error (eV/Å)")
    md.set_defaults(func=cmd_md)


def cmd_md(args: argparse.Namespace) -> int:
    from mlmd_lab.md import resume, run

    if args.model:
        potential = _connect(args).models.load(args.model, version=args.version)
    else:
        from mlmd_lab.potentials.model import HDNNP

        potential = HDNNP.from_n2p2(args.n2p2, energy_unit=args.energy_unit, length_unit=args.length_unit,
                                    units=args.units)
    if args.resume:
        result = resume(potential, args.workdir, steps=args.steps, progress=sys.stderr.isatty())
    else:
        if not args.structure:
            raise MLMDError("give --structure FILE (any format ASE reads), or --resume to continue a run")
        frames = _read_structures(args.structure, args.index)
        if len(frames) != 1:
            raise MLMDError(f"--index {args.index} selects {len(frames)} frames of {args.structure}; MD starts from "
                            "one: give a single index, e.g. --index -1")
        atoms = frames[0]
        if args.repeat:
            atoms = atoms.repeat(args.repeat)
        steps = 1000 if args.steps is None else args.steps
        result = run(potential, atoms, ensemble=args.ensemble, temperature=args.temperature, pressure=args.pressure,
                     timestep=args.timestep, steps=steps, workdir=args.workdir, barostat=args.barostat,
                     skin=args.skin, dtype=args.dtype, seed=args.seed, trajectory_interval=args.interval,
                     log_interval=args.interval, on_extrapolation=args.on_extrapolation,
                     max_force_spread=args.max_force_spread, progress=sys.stderr.isatty(),
                     neighbours=args.neighbours)
    thermo = result.thermo
    last = {k: float(v[-1]) for k, v in thermo.items()} if len(thermo["step"]) else {}
    print(f"{result.steps} steps of {len(result.atoms)} atoms in {result.wall_s:.1f} s "
          f"({result.atom_steps_per_s:.3g} atom-steps/s, {result.rebuilds} neighbour rebuilds)")
    print(f"computed on {result.compute}")
    if last:
        print(f"step {int(last['step'])}: T = {last['temperature_K']:.1f} K, E_tot = {last['etot_eV']:.6f} eV, "
              f"P = {last['pressure_GPa']:.4f} GPa")
    print(f"output in {result.workdir}: md.traj, md.log, restart.npz")
    return 0


def _slhmc_args(sub) -> None:
    sh = sub.add_parser("slhmc", help="self-learning hybrid Monte Carlo: the reference's (DFT's) ensemble exactly, "
                                      "proposals by ML MD; run again with the same --workdir to resume or extend")
    source = sh.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="name of the proposal potential in the potential database")
    source.add_argument("--n2p2", metavar="FOLDER", help="proposal potential: folder with n2p2 files (eV, Å)")
    sh.add_argument("--version", type=int, help="model version (default: latest)")
    sh.add_argument("--reference", default="qe", choices=("qe", "pyscf", "vasp", "emt"),
                    help="the reference: a DFT recipe (results land in the database) or ASE's EMT (for trying)")
    sh.add_argument("--option", nargs="*", default=[], metavar="KEY=VALUE", help="DFT recipe settings (as label)")
    sh.add_argument("--structure", required=True, help="starting structure, any ASE-readable file")
    sh.add_argument("--index", default="-1", help="frame of the structure file (default: the last)")
    sh.add_argument("--temperature", type=float, required=True, help="K")
    sh.add_argument("--trials", type=int, required=True, help="trials in the chain (the total, when resuming)")
    sh.add_argument("--md-steps", type=int, default=20, help="velocity-Verlet steps per trial (default 20)")
    sh.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    sh.add_argument("--ensemble", default="nvt", choices=("nvt", "npt"))
    sh.add_argument("--pressure", type=float, help="GPa (NPT)")
    sh.add_argument("--volume-step", type=float, default=0.02, help="ln V half-width of the volume moves (NPT)")
    sh.add_argument("--learn-trials", type=int, default=0, help="trials of the learning phase (retraining)")
    sh.add_argument("--retrain-every", type=int, help="trials between retrainings in the learning phase")
    sh.add_argument("--seed", type=int, default=0)
    sh.add_argument("--delayed-acceptance", action="store_true",
                    help="screen proposals with the ML energy first (exact; saves reference calls)")
    sh.add_argument("--workdir", required=True, help="folder for chain.log, states.traj, restart.npz")
    sh.set_defaults(func=cmd_slhmc)


def cmd_slhmc(args: argparse.Namespace) -> int:
    from mlmd_lab import slhmc

    db = _connect(args) if args.model or args.reference != "emt" else None
    if args.model:
        potential = db.models.load(args.model, version=args.version)
    else:
        from mlmd_lab.potentials.model import HDNNP

        potential = HDNNP.from_n2p2(args.n2p2)
    if args.reference == "emt":
        from ase.calculators.emt import EMT

        reference = EMT()
    else:
        reference = _recipe(args.reference, args.option)
    frames = _read_structures(args.structure, args.index)
    if len(frames) != 1:
        raise MLMDError(f"--index {args.index} selects {len(frames)} frames of {args.structure}; give one index")
    result = slhmc.run(reference, potential, frames[0], temperature=args.temperature, n_trials=args.trials,
                       md_steps=args.md_steps, timestep=args.timestep, ensemble=args.ensemble, pressure=args.pressure,
                       seed=args.seed, learn_trials=args.learn_trials, retrain_every=args.retrain_every,
                       workdir=args.workdir, db=db, progress=sys.stderr.isatty(), volume_step=args.volume_step,
                       delayed_acceptance=args.delayed_acceptance)
    print(f"{len(result.accepted)} trials, acceptance {result.acceptance_rate:.3f}, "
          f"{result.n_reference_calls} reference calls; phases {result.phases}")
    start, stop = result.phases["production"]
    if stop - start >= 4:
        for name, average in result.averages().items():
            print(f"{name}: {average.mean:.6g} ± {average.stderr:.2g} (tau_int {average.tau_int:.1f} trials, "
                  f"{average.reference_calls_per_sample:.1f} reference calls per independent sample)")
    print(f"output in {args.workdir}: chain.log, states.traj, reference.traj, restart.npz")
    return 0


def _learn_args(sub) -> None:
    le = sub.add_parser("learn", help="build a validated committee potential automatically from one or a few "
                                      "structures (mlmd_lab.learn.run); run again with the same --workdir to continue")
    le.add_argument("structure", metavar="STRUCTURE_FILE", help="starting structures, any ASE-readable file (Å)")
    le.add_argument("--index", default=":", help="frames of the file to start from (default: all)")
    le.add_argument("--reference", required=True, choices=("emt", "qe", "vasp", "pyscf"),
                    help="the reference: a DFT recipe, or emt (ASE's EMT, for trying: Al Cu Ag Au Ni Pd Pt)")
    le.add_argument("--option", nargs="*", default=[], metavar="KEY=VALUE", help="recipe settings (as label)")
    le.add_argument("--temperatures", nargs="+", type=float, required=True, metavar="K",
                    help="exploration temperatures in K, e.g. 300 600")
    le.add_argument("--pressures", nargs="+", type=float, metavar="GPa",
                    help="exploration pressures in GPa: NPT at each (default: NVT)")
    le.add_argument("--workdir", required=True, help="folder of the loop's state (a rerun continues from it)")
    le.add_argument("--committee", type=int, help="committee members (default 4)")
    le.add_argument("--max-iterations", type=int, help="most iterations (default 20)")
    le.add_argument("--budget", type=int, help="most reference calculations in all (default: no limit)")
    le.add_argument("--per-iteration", type=int, help="most reference calculations per iteration (default 12)")
    le.add_argument("--model-name", help="name in the potential database (default learn-<elements>)")
    le.add_argument("--trust", nargs=2, type=float, metavar=("LO", "HI"),
                    help="trust levels of the calibrated max-atom force uncertainty in eV/Å (default: suggested)")
    le.add_argument("--md-steps", type=int, help="exploration MD steps per condition and iteration (default 400)")
    le.add_argument("--timestep", type=float, help="exploration MD time step in fs (default 1)")
    le.add_argument("--frame-interval", type=int, help="MD steps between explored frames (default 10)")
    le.add_argument("--seed", type=int, help="seed of the seed set, training and MD (default 0)")
    le.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                    help="training settings per iteration (TrainingConfig fields), e.g. hidden=10,10 max_epochs=500")
    le.add_argument("--cluster", default=None,
                    help="run the reference on local, slurm, pbs, sge or pjm (default: here, or the profile's kind)")
    le.add_argument("--profile", help="cluster profile of the clusters config file")
    le.add_argument("--jobs", type=int, default=1, help="workers (local) or batch jobs to start (default 1)")
    le.set_defaults(func=cmd_learn)


def cmd_learn(args: argparse.Namespace) -> int:
    from mlmd_lab import learn

    structures = _read_structures(args.structure, args.index)
    recipe = _recipe(args.reference, args.option)
    if args.reference == "emt":
        _check_emt_elements(structures)
    given = dict(committee=args.committee, max_iterations=args.max_iterations, reference_budget=args.budget,
                 per_iteration=args.per_iteration, model_name=args.model_name, md_steps=args.md_steps,
                 timestep=args.timestep, frame_interval=args.frame_interval, seed=args.seed,
                 trust=tuple(args.trust) if args.trust else None, train_config=_config_overrides(args.config) or None)
    options = {key: value for key, value in given.items() if value is not None}
    db = _connect(args)
    cluster = None
    if args.cluster or args.profile:
        from mlmd_lab.cluster import cluster as make_cluster

        cluster = make_cluster(args.cluster, args.profile,
                               **({"n_workers": args.jobs} if args.cluster == "local" else {}))
        if args.cluster != "local":
            cluster.scale(jobs=args.jobs)
    formulas = ", ".join(sorted({a.get_chemical_formula() for a in structures}))
    print(f"learning a potential for {formulas} ({len(structures)} starting structure"
          f"{'s' * (len(structures) != 1)}) with the {args.reference} reference; state in {args.workdir}")
    print("iter  frames  val |dF|  trust (eV/Å)  accurate/candidate/failed per condition", flush=True)
    try:
        result = learn.run(recipe, structures, temperatures=args.temperatures, pressures=args.pressures, db=db,
                           workdir=args.workdir, cluster=cluster, progress=True, **options)
    finally:
        if cluster is not None:
            cluster.close()
    print(f"stop reason: {result.stop_reason} (converged: {result.converged}) after {len(result.iterations)} "
          f"iterations, {result.n_reference_calls} reference calls")
    if result.failed_tasks:
        print(f"{len(result.failed_tasks)} reference calculations failed (recorded, not run again); first: "
              f"{result.failed_tasks[0][1][:200]}")
    if result.model_name:
        print(f"model: {result.model_name} v{result.model_version} in the potential database "
              f"(mlmd-lab models show {result.model_name})")
    else:
        print("no model saved" + ("; run the same command again to continue" if result.stop_reason == "stopped"
                                  else ""))
    return 1 if result.stop_reason == "reference failures" else 0


def _models_args(sub) -> None:
    m = sub.add_parser("models", help="saved potentials: list (default), show NAME, export NAME FOLDER")
    m.set_defaults(func=cmd_models_list, elements=None, exclusive=False, tags=None, all_versions=False)
    actions = m.add_subparsers(title="actions")
    ls = actions.add_parser("list", help="table of saved models (latest version of each name)")
    ls.add_argument("--elements", nargs="*", help="models covering these elements")
    ls.add_argument("--exclusive", action="store_true", help="models made only of these elements (any subset)")
    ls.add_argument("--tags", nargs="*")
    ls.add_argument("--all", dest="all_versions", action="store_true", help="every version, not just the latest")
    ls.set_defaults(func=cmd_models_list)
    show = actions.add_parser("show", help="one saved model as JSON (record and provenance)")
    show.add_argument("name")
    show.add_argument("--version", type=int, help="version (default: the latest)")
    show.set_defaults(func=cmd_models_show)
    exp = actions.add_parser("export", help="write a saved model's n2p2 files and provenance.json into FOLDER")
    exp.add_argument("name")
    exp.add_argument("folder")
    exp.add_argument("--version", type=int, help="version (default: the latest)")
    exp.set_defaults(func=cmd_models_export)


def _query_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--elements", nargs="*", help="element symbols")
    q.add_argument("--exclusive", action="store_true", help="only frames made of these elements (any subset)")
    q.add_argument("--formula", help="reduced formula, e.g. H2O")
    q.add_argument("--settings", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. code=vasp xc=PBE")
    q.add_argument("--tags", nargs="*")
    q.add_argument("--limit", type=int)


def _connect(args: argparse.Namespace):
    return cli_access.connect_from_args(args)


def parse_value(text: str) -> Any:
    """'520' → 520, '0.05' → 0.05, 'true' → True, 'none' → None, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MLMDError(f"expected KEY=VALUE, got {pair!r}")
        out[key] = parse_value(value)
    return out


def query_spec(pairs: list[str]) -> dict[str, Any]:
    """``elements=Ti,O formula=TiO2 xc=PBE`` → ``db.frames`` keyword arguments (other keys: settings)."""
    raw = parse_pairs(pairs)
    spec: dict[str, Any] = {}
    settings = {}
    for key, value in raw.items():
        if key in ("elements", "tags"):
            spec[key] = str(value).replace(",", " ").split()
        elif key in QUERY_KEYS:
            spec[key] = value
        else:
            settings[key] = value
    if settings:
        spec["settings"] = settings
    return spec


def cmd_ingest(args: argparse.Namespace) -> int:
    db = _connect(args)
    report = db.ingest(args.paths, units=args.units, settings=parse_pairs(args.settings) or None,
                       tags=args.tags, last_only=args.last_only, allow_unfinished=args.allow_unfinished,
                       workers=args.workers, progress=not args.no_progress,
                       keys={k: str(v) for k, v in parse_pairs(args.keys).items()} or None,
                       visibility=args.visibility, dataset=args.dataset, licence=args.licence, group=args.group,
                       embargo_until=args.embargo_until)
    print(report)
    return 1 if report.failed and not (report.added or report.skipped) else 0


def cmd_query(args: argparse.Namespace) -> int:
    db = _connect(args)
    frames = db.frames(elements=args.elements, exclusive=args.exclusive, formula=args.formula,
                       settings=parse_pairs(args.settings) or None, tags=args.tags, limit=args.limit)
    print(frames.summary())
    if args.export:
        if args.format == "extxyz":
            frames.to_extxyz(args.export)
        elif args.format == "n2p2":
            from mlmd_lab.units import parse_units

            energy, length = parse_units(args.export_units)
            frames.to_n2p2(args.export, energy_unit=energy, length_unit=length)
        else:
            frames.to_deepmd(args.export)
        print(f"wrote {len(frames)} frames to {args.export} ({args.format})")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    print(_connect(args).summary())
    return 0


def cmd_compatible(args: argparse.Namespace) -> int:
    report = _connect(args).compatible(query_spec(args.a), query_spec(args.b))
    print(report)
    return 0 if report.ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    from ase import units

    from mlmd_lab.train.trainer import Trainer, train_ensemble

    db = _connect(args)
    query = {k: v for k, v in (("formula", args.formula), ("tags", args.tags),
                               ("settings", parse_pairs(args.settings) or None)) if v}
    overrides = _config_overrides(args.config)
    if args.epochs:
        overrides["max_epochs"] = args.epochs
    if args.time_limit:
        overrides["time_limit"] = args.time_limit
    if args.ensemble > 1:
        frames = db.frames(elements=args.elements, exclusive=True, **query)
        if len(frames) == 0:
            raise MLMDError(f"no labelled frames of {'-'.join(args.elements)} in the database; ingest data first")
        model = train_ensemble(frames, args.ensemble, workdir=args.workdir, query=frames.query, **overrides)
        errors = model.metadata.get("errors", {})
    else:
        trainer = Trainer.from_database(db, args.elements, workdir=args.workdir, **query, **overrides)
        model = trainer.fit()
        errors = trainer.errors
    record = db.models.save(model, args.name, description=args.description)
    test = errors.get("test") or errors.get("validation") or {}
    if test:
        stress = f", stress {test['stress_rmse'] / units.GPa:.3f} GPa" if "stress_rmse" in test else ""
        print(f"held-out RMSE: energy {test.get('energy_rmse', float('nan')) * 1e3:.3f} meV/atom, "
              f"forces {test.get('force_rmse', float('nan')) * 1e3:.1f} meV/Å{stress} ({test.get('n_frames')} frames)")
    print(f"saved {record.name} v{record.version} ({record.kind}, {' '.join(record.elements)})")
    return 0


def _config_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as TrainingConfig fields; tuple fields take comma lists (``hidden=30,30``)."""
    from dataclasses import fields

    from mlmd_lab.train.trainer import TrainingConfig

    known = {f.name: f for f in fields(TrainingConfig)}
    out = {}
    for key, value in parse_pairs(pairs).items():
        if key not in known:
            raise MLMDError(f"unknown training setting {key!r}; known: {', '.join(sorted(known))}")
        if isinstance(getattr(TrainingConfig(), key), tuple):
            value = tuple(parse_value(v) for v in str(value).split(","))
        out[key] = value
    return out


def cmd_models_list(args: argparse.Namespace) -> int:
    records = _connect(args).models.find(elements=args.elements, exclusive=args.exclusive, tags=args.tags,
                                         latest_only=not args.all_versions)
    if not records:
        print("no saved models")
        return 0
    header = ("name", "version", "elements", "kind", "val force RMSE (meV/Å)", "val energy RMSE (meV/atom)",
              "created")
    rows = [header]
    for r in records:
        energy, force = r.rmse("validation")
        rows.append((r.name, str(r.version), " ".join(r.elements), r.kind,
                     "-" if force is None else f"{force:.1f}", "-" if energy is None else f"{energy:.2f}",
                     r.created.strftime("%Y-%m-%d %H:%M UTC") if r.created else "-"))
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    record = _connect(args).models.record(args.name, args.version)
    print(json.dumps(record.to_dict(), indent=2, ensure_ascii=False))
    return 0


def cmd_models_export(args: argparse.Namespace) -> int:
    models = _connect(args).models
    record = models.record(args.name, args.version)
    folder = models.export(args.name, args.folder, version=record.version)
    print(f"wrote {record.name} v{record.version} ({record.kind}, {' '.join(record.elements)}; "
          f"units {record.energy_unit}, {record.length_unit}) to {folder}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from mlmd_lab.db import EmbeddedServer

    if args.action == "start" and args.auth:
        return cli_access.start_server(args)
    server = EmbeddedServer(args.data_dir)
    if args.action == "start":
        info = server.pin()
        print(f"embedded database running: {info.uri} (pid {info.pid}, data in {server.data_dir}); "
              "stop it with: mlmd-lab server stop")
    elif args.action == "stop":
        print("stopped" if server.stop() else f"no embedded server running for {server.data_dir}")
    else:
        info = server.status()
        print(json.dumps({"running": info is not None, "data_dir": str(server.data_dir),
                          **({"uri": info.uri, "pid": info.pid, "clients": server.clients()} if info else {})}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mlmd_lab.demo import run_demo

    results = run_demo(_connect(args), samples=Path(args.samples) if args.samples else None, workdir=args.workdir,
                       quickstart=args.quickstart and not args.no_quickstart, autobuild=not args.no_autobuild,
                       autobuild_workdir=args.autobuild_workdir, engine=args.engine)
    status = 0
    for result in results:
        if not result.passed:
            failed = "; ".join(text for ok, text in result.checks if not ok)
            what = "quickstart" if type(result).__name__ == "QuickstartResult" else "automatic construction"
            print(f"mlmd-lab demo: {what} checks failed ({failed}); see {result.report_path}", file=sys.stderr)
            status = 3
    return status


def cmd_lab(args: argparse.Namespace) -> int:
    from mlmd_lab.jupyter import launch_lab

    return launch_lab(notebooks=args.notebooks, port=args.port, ip=args.ip, open_browser=not args.no_browser,
                      uri=args.uri, data_dir=args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
