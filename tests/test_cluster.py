"""mlmd_lab.cluster: job scripts directive by directive, profiles, MPI command lines, and real schedulers.

Fast tests build job scripts without submitting anything. Slow tests (``-m slow``) run dask workers for real:
through a fake ``pjsub``/``pjdel`` pair that speaks PJM's output format, through a single-node Slurm started by
``scripts/start_slurm.sh`` (needs root and the Debian packages of scripts/apt-packages.txt), and through Slurm's
PBS-compatible ``qsub``/``qdel`` (slurm-wlm-torque).
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import mlmd_lab
import mlmd_lab.cluster as mc
from mlmd_lab.cluster import mpi
from mlmd_lab.cluster.pjm import PJMCluster, PJMJob
from mlmd_lab.errors import MLMDError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

BASE = dict(
    cores=4,
    processes=2,
    memory="8GB",
    queue="q1",
    account="acc1",
    walltime="01:30:00",
    prologue=["module load qe/7.2", "source /opt/venv/bin/activate"],
    job_extra_directives=["EXTRA-1", "EXTRA-2"],
)


def split_script(script: str, prefix: str):
    """(shebang, directive lines, body lines before the worker, worker command tokens)."""
    lines = [line for line in script.splitlines() if line.strip()]
    shebang = lines[0]
    directives = [line for line in lines[1:] if line.startswith(prefix)]
    others = [line for line in lines[1:] if not line.startswith(prefix)]
    assert others, "no worker command in the job script"
    return shebang, directives, others[:-1], shlex.split(others[-1])


def worker_args(tokens: list[str]) -> dict[str, str]:
    """Options of the dask worker command line ('--flag' -> value or '')."""
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is not None and not nxt.startswith("--"):
                out[tok] = nxt
                i += 2
                continue
            out[tok] = ""
        i += 1
    return out


def check_worker_command(tokens, nthreads, memory_limit, nworkers=None):
    assert tokens[:3] == [PY, "-m", "distributed.cli.dask_worker"]
    assert tokens[3] == "tcp://<insert-scheduler-address-here>:8786"
    args = worker_args(tokens[4:])
    assert args["--name"] == "dummy-name"
    assert args["--nthreads"] == str(nthreads)
    assert args["--memory-limit"] == memory_limit
    if nworkers is None:
        assert "--nworkers" not in args
    else:
        assert args["--nworkers"] == str(nworkers)
    assert "--nanny" in args
    assert args["--death-timeout"] == "60"
    assert args["--resources"] == f"cores={nthreads}"
    return args


# ------------------------------------------------------------------------------------------ job scripts


def test_slurm_job_script_directive_by_directive(tmp_path):
    script = mc.job_script("slurm", **BASE, log_directory=str(tmp_path / "logs"), interface="lo")
    shebang, directives, prologue, cmd = split_script(script, "#SBATCH")
    assert shebang == "#!/usr/bin/env bash"
    assert directives == [
        "#SBATCH -J dask-worker",
        f"#SBATCH -e {tmp_path}/logs/dask-worker-%J.err",
        f"#SBATCH -o {tmp_path}/logs/dask-worker-%J.out",
        "#SBATCH -p q1",  # queue -> partition
        "#SBATCH -A acc1",  # account
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=4",  # cores
        "#SBATCH --mem=8G",  # memory 8GB = 7.45 GiB, rounded up in Slurm's GiB
        "#SBATCH -t 01:30:00",  # walltime
        "#SBATCH EXTRA-1",
        "#SBATCH EXTRA-2",
    ]
    assert prologue == BASE["prologue"]
    args = check_worker_command(cmd, nthreads=2, memory_limit="3.73GiB", nworkers=2)
    assert args["--interface"] == "lo"
    assert (tmp_path / "logs").is_dir()


def test_slurm_job_cpu_and_job_mem_override():
    script = mc.job_script("slurm", cores=2, memory="4GB", job_cpu=3, job_mem="5G", job_name="dft")
    _, directives, _, cmd = split_script(script, "#SBATCH")
    assert "#SBATCH --cpus-per-task=3" in directives
    assert "#SBATCH --mem=5G" in directives
    assert directives[0] == "#SBATCH -J dft"
    assert "#SBATCH -t 00:30:00" in directives  # dask-jobqueue's default walltime
    check_worker_command(cmd, nthreads=2, memory_limit="3.73GiB")  # default processes=1: one 2-thread worker


def test_pbs_job_script_directive_by_directive(tmp_path):
    script = mc.job_script("pbs", **BASE, log_directory=str(tmp_path))
    shebang, directives, prologue, cmd = split_script(script, "#PBS")
    assert shebang == "#!/usr/bin/env bash"
    assert directives == [
        "#PBS -N dask-worker",
        "#PBS -q q1",
        "#PBS -A acc1",
        "#PBS -l select=1:ncpus=4:mem=7630MB",  # cores and memory (8e9 B = 7630 MiB, written MB)
        "#PBS -l walltime=01:30:00",
        f"#PBS -e {tmp_path}/",
        f"#PBS -o {tmp_path}/",
        "#PBS EXTRA-1",
        "#PBS EXTRA-2",
    ]
    assert prologue == BASE["prologue"]
    check_worker_command(cmd, nthreads=2, memory_limit="3.73GiB", nworkers=2)


def test_pbs_resource_spec_replaces_select():
    script = mc.job_script("pbs", cores=48, memory="180GB", resource_spec="select=1:ncpus=48:mpiprocs=48")
    _, directives, _, cmd = split_script(script, "#PBS")
    assert "#PBS -l select=1:ncpus=48:mpiprocs=48" in directives
    assert not any("mem=" in d for d in directives)
    check_worker_command(cmd, nthreads=48, memory_limit="167.64GiB")  # default processes=1


def test_sge_job_script_directive_by_directive(tmp_path):
    script = mc.job_script("sge", **BASE, resource_spec="m_mem_free=4G", log_directory=str(tmp_path))
    shebang, directives, prologue, cmd = split_script(script, "#$")
    assert shebang == "#!/usr/bin/env bash"
    assert directives == [
        "#$ -N dask-worker",
        "#$ -q q1",
        "#$ -P acc1",  # account -> SGE project
        "#$ -l m_mem_free=4G",
        "#$ -l h_rt=01:30:00",
        f"#$ -e {tmp_path}/",
        f"#$ -o {tmp_path}/",
        "#$ -cwd",
        "#$ -j y",
        "#$ EXTRA-1",
        "#$ EXTRA-2",
    ]
    assert prologue == BASE["prologue"]
    check_worker_command(cmd, nthreads=2, memory_limit="3.73GiB", nworkers=2)


def test_pjm_job_script_directive_by_directive(tmp_path):
    script = mc.job_script(
        "pjm",
        **BASE,
        rscunit="rscunit_ft01",
        nodes=2,
        mpi_procs=96,
        node_mem="28Gi",
        log_directory=str(tmp_path),
        job_name="mlmd-dft",
    )
    shebang, directives, prologue, cmd = split_script(script, "#PJM")
    assert shebang == "#!/usr/bin/env bash"
    assert directives == [
        "#PJM -N mlmd-dft",
        '#PJM -L "rscunit=rscunit_ft01"',
        '#PJM -L "rscgrp=q1"',  # queue -> resource group
        "#PJM -g acc1",  # account -> group
        '#PJM -L "node=2"',
        '#PJM -L "elapse=01:30:00"',  # walltime
        '#PJM -L "node-mem=28Gi"',
        '#PJM --mpi "proc=96"',
        f'#PJM -o "{tmp_path}/mlmd-dft.%j.out"',
        f'#PJM -e "{tmp_path}/mlmd-dft.%j.err"',
        "#PJM EXTRA-1",
        "#PJM EXTRA-2",
    ]
    assert prologue == BASE["prologue"]
    check_worker_command(cmd, nthreads=2, memory_limit="3.73GiB", nworkers=2)


def test_pjm_minimal_job_script_and_defaults():
    script = mc.job_script("pjm", cores=48, processes=1, memory="28GB")
    shebang, directives, prologue, cmd = split_script(script, "#PJM")
    assert directives == ['#PJM -N dask-worker', '#PJM -L "node=1"', '#PJM -L "elapse=00:30:00"']
    assert prologue == []
    check_worker_command(cmd, nthreads=48, memory_limit="26.08GiB")


def test_pjm_directives_follow_pjm_syntax():
    """Every generated #PJM line is one of the forms documented for pjsub (see mlmd_lab/cluster/pjm.py)."""
    import re

    forms = [
        r'-L "(rscunit|rscgrp|node|elapse|node-mem)=[^"\s]+"',
        r"-g [A-Za-z0-9_-]+",
        r"-N [A-Za-z0-9_.-]+",
        r'--mpi "proc=\d+"',
        r'-[oe] "[^"]+"',
    ]
    script = mc.job_script(
        "pjm", **{**BASE, "job_extra_directives": []}, rscunit="u", mpi_procs=4, node_mem="1Gi", log_directory="/tmp"
    )
    _, directives, _, _ = split_script(script, "#PJM")
    assert len(directives) == 10
    for line in directives:
        body = line[len("#PJM ") :]
        assert any(re.fullmatch(f, body) for f in forms), line
    assert re.fullmatch(r'-L "elapse=\d+:[0-5]\d:[0-5]\d"', directives[5][5:])


@pytest.mark.parametrize(
    ("kind", "prefix", "skip", "gone"),
    [
        ("slurm", "#SBATCH", ["-A", "--mem"], ["#SBATCH -A acc1", "#SBATCH --mem=8G"]),
        ("pbs", "#PBS", ["-A", "walltime"], ["#PBS -A acc1", "#PBS -l walltime=01:30:00"]),
        ("sge", "#$", ["-P", "-cwd"], ["#$ -P acc1", "#$ -cwd"]),
        ("pjm", "#PJM", ["-g", "elapse"], ["#PJM -g acc1", '#PJM -L "elapse=01:30:00"']),
    ],
)
def test_job_directives_skip(kind, prefix, skip, gone):
    full = split_script(mc.job_script(kind, **BASE), prefix)[1]
    extra = [f"-A extra-kept elapse -g -P {kind}"]
    opts = {**BASE, "job_extra_directives": extra}
    skipped = split_script(mc.job_script(kind, **opts, job_directives_skip=skip), prefix)[1]
    for line in gone:
        assert line in full and line not in skipped
    # the skip list removes generated lines only, never the extra directives
    assert skipped[-1] == f"{prefix} {extra[0]}"
    assert [d for d in full if d not in gone and "EXTRA" not in d] == skipped[:-1]


def test_pjm_job_id_regexp_parses_pjsub_output():
    job = PJMJob("tcp://127.0.0.1:8786", name="w", cores=1, memory="1GB")
    assert job._job_id_from_submit_output("[INFO] PJM 0000 pjsub Job 12345 submitted.\n") == "12345"
    assert job._job_id_from_submit_output("some banner\n[INFO] PJM 0000 pjsub Job 7 submitted.") == "7"
    with pytest.raises(ValueError, match="Could not parse job id"):
        job._job_id_from_submit_output("[ERR.] PJM 0057 pjsub node=32 is greater than the upper limit (24).")
    assert (PJMJob.submit_command, PJMJob.cancel_command, PJMJob.config_name) == ("pjsub", "pjdel", "pjm")
    assert PJMCluster.job_cls is PJMJob


def test_pjm_dask_config_block(monkeypatch):
    import dask

    assert dask.config.get("jobqueue.pjm.walltime") == "00:30:00"
    with dask.config.set({"jobqueue.pjm.queue": "debug-o", "jobqueue.pjm.account": "gz00"}):
        job = PJMJob("tcp://127.0.0.1:8786", name="w", cores=1, memory="1GB")
    assert '#PJM -L "rscgrp=debug-o"' in job.job_header and "#PJM -g gz00" in job.job_header


@pytest.mark.parametrize("kind", ["pbs", "slurm", "sge", "pjm"])
def test_cluster_object_gives_the_same_script_and_submits_nothing(kind, tmp_path, monkeypatch):
    # no submit command reachable: creating the cluster must not try to submit
    monkeypatch.setenv("PATH", str(tmp_path))
    c = mc.cluster(kind, **BASE, scheduler_options={"dashboard_address": ":0"})
    try:
        assert type(c).__name__ == {"pbs": "PBSCluster", "slurm": "SLURMCluster", "sge": "SGECluster"}.get(
            kind, "PJMCluster"
        )
        placeholder = "tcp://<insert-scheduler-address-here>:8786"
        assert c.job_script().replace(c.scheduler_address, placeholder) == mc.job_script(kind, **BASE)
        assert len(c.worker_spec) == 0 and len(c.workers) == 0
    finally:
        c.close()


def test_jobs_without_submit_command_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MLMDError, match="pjsub not found on PATH"):
        mc.cluster("pjm", cores=1, memory="1GB", jobs=1)


# ------------------------------------------------------------------------------------------- profiles

PROFILES = textwrap.dedent(
    """\
    [profiles.wisteria]
    kind = "pjm"
    description = "Wisteria-O"
    queue = "regular-o"
    account = "gz00"
    walltime = "01:00:00"
    cores = 48
    processes = 1
    memory = "28GB"
    prologue = ["module load python/3.11", "source ~/venvs/mlmd/bin/activate"]

    [profiles.lab]
    kind = "slurm"
    queue = "cpu"
    account = "mylab"
    walltime = "04:00:00"
    cores = 16
    memory = "60GB"
    job_extra_directives = ["--constraint=skylake"]
    scheduler_options = {dashboard_address = ":0"}

    [profiles.laptop]
    cores = 2
    """
)


@pytest.fixture
def profiles_file(tmp_path, monkeypatch):
    path = tmp_path / "clusters.toml"
    path.write_text(PROFILES)
    monkeypatch.setenv("MLMD_CLUSTER_CONFIG", str(path))
    return path


def test_load_profiles_and_config_path(profiles_file):
    assert mc.config_path() == profiles_file
    profiles = mc.load_profiles()
    assert sorted(profiles) == ["lab", "laptop", "wisteria"]
    assert profiles["wisteria"]["kind"] == "pjm" and profiles["wisteria"]["description"] == "Wisteria-O"
    assert profiles["wisteria"]["prologue"][0] == "module load python/3.11"
    assert profiles["laptop"] == {"kind": "local", "cores": 2}
    assert mc.profile("lab")["scheduler_options"] == {"dashboard_address": ":0"}


def test_default_config_path_is_user_config_dir(monkeypatch):
    monkeypatch.delenv("MLMD_CLUSTER_CONFIG", raising=False)
    from platformdirs import user_config_dir

    assert mc.config_path() == Path(user_config_dir("mlmd_lab", appauthor=False)) / "clusters.toml"


def test_profile_with_overrides_in_the_job_script(profiles_file):
    script = mc.job_script(profile="wisteria", walltime="00:20:00", queue="debug-o")
    _, directives, prologue, cmd = split_script(script, "#PJM")
    assert directives == [
        "#PJM -N dask-worker",
        '#PJM -L "rscgrp=debug-o"',  # overridden
        "#PJM -g gz00",
        '#PJM -L "node=1"',
        '#PJM -L "elapse=00:20:00"',  # overridden
    ]
    assert prologue == ["module load python/3.11", "source ~/venvs/mlmd/bin/activate"]
    check_worker_command(cmd, nthreads=48, memory_limit="26.08GiB")
    kind, opts = mc.resolve_options(profile="lab", walltime=None, cores=8)
    assert kind == "slurm" and opts["cores"] == 8 and opts["walltime"] == "04:00:00"


def test_profile_errors(profiles_file, tmp_path):
    with pytest.raises(MLMDError, match=r"no cluster profile 'nope' .*profiles there: lab, laptop, wisteria"):
        mc.profile("nope")
    with pytest.raises(MLMDError, match="profile 'wisteria' is of kind 'pjm' but kind='slurm'"):
        mc.job_script("slurm", profile="wisteria")
    bad = tmp_path / "bad.toml"
    bad.write_text('[profiles.x]\nkind = "slurm"\ncores = 2\nmemory = "1GB"\nqueu = "debug"\n')
    with pytest.raises(MLMDError, match=r"unknown option queu for cluster kind 'slurm' \(profile 'x' in .*bad.toml\)"):
        mc.load_profiles(bad)
    with pytest.raises(MLMDError, match="known options are .*account.*queue.*walltime"):
        mc.load_profiles(bad)
    bad.write_text('[profiles.x]\nkind = "slurm"\nwalltime = "2h"\n')
    with pytest.raises(MLMDError, match=r"walltime '2h' is not HH:MM:SS.*profile 'x'"):
        mc.load_profiles(bad)
    bad.write_text('[profiles.x]\nkind = "torque"\n')
    with pytest.raises(MLMDError, match="unknown cluster kind 'torque': use one of local, pbs, slurm, sge, pjm"):
        mc.load_profiles(bad)
    bad.write_text("[profiles.x\nkind=1")
    with pytest.raises(MLMDError, match="not valid TOML"):
        mc.load_profiles(bad)
    bad.write_text('kind = "slurm"\n')
    with pytest.raises(MLMDError, match=r"put each profile under \[profiles.NAME\]"):
        mc.load_profiles(bad)
    with pytest.raises(MLMDError, match="cluster profiles file not found"):
        mc.load_profiles(tmp_path / "missing.toml")


def test_missing_default_file_means_no_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("MLMD_CLUSTER_CONFIG", str(tmp_path / "none.toml"))
    assert mc.load_profiles() == {}
    with pytest.raises(MLMDError, match=r"no cluster profile 'x' .*profiles there: none"):
        mc.cluster(profile="x")


def test_save_profile_round_trip(tmp_path):
    path = tmp_path / "sub" / "clusters.toml"
    mc.save_profile("a", "pbs", path, queue="workq", walltime="02:00:00", cores=8, memory="16GB",
                    prologue=['module load "x"', "export A=1\tB"], description="PBS Pro")
    mc.save_profile("b", "local", path, cores=2)
    mc.save_profile("a", "pbs", path, queue="long", cores=8, memory="16GB")  # replaces a
    profiles = mc.load_profiles(path)
    assert profiles["b"] == {"kind": "local", "cores": 2}
    assert profiles["a"] == {"kind": "pbs", "queue": "long", "cores": 8, "memory": "16GB"}
    mc.save_profile("c", "slurm", path, cores=1, memory="1GB", prologue=['module load "x"', "a\tb"],
                    scheduler_options={"dashboard_address": ":0"})
    assert mc.profile("c", path)["prologue"] == ['module load "x"', "a\tb"]
    assert mc.profile("c", path)["scheduler_options"] == {"dashboard_address": ":0"}
    with pytest.raises(MLMDError, match="walltime"):
        mc.save_profile("d", "slurm", path, walltime="25:61:00")
    with pytest.raises(MLMDError, match="profile name"):
        mc.save_profile("bad name", "slurm", path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="slurm", cores=1, memory="1GB", walltime="1:00"), "walltime '1:00' is not HH:MM:SS"),
        (dict(kind="slurm", cores=1, memory="1GB", walltime="01:60:00"), "is not HH:MM:SS"),
        (dict(kind="slurm", cores=1, memory="1GB", walltime=3600), "is not HH:MM:SS"),
        (dict(kind="pbs", cores=1, memory="lots"), "memory 'lots' is not a memory size"),
        (dict(kind="pbs", cores=1, memory=4), "memory=4 needs a unit"),
        (dict(kind="pbs", cores=0, memory="1GB"), "option cores=0 must be a whole number >= 1"),
        (dict(kind="pbs", cores=2, processes=4, memory="1GB"), "processes=4 exceeds cores=2"),
        (dict(kind="sge", cores=1, memory="1GB", prologue=[1]), "must be a list of strings"),
        (dict(kind="pjm", cores=1, memory="1GB", nodes="2"), "nodes='2' .* whole number"),
        (dict(kind="slurm", cores=1), "a slurm cluster needs memory per job"),
        (dict(kind="slurm", cores=1, memory="1GB", rscgrp="x"), "unknown option rscgrp for cluster kind 'slurm'"),
        (dict(kind="pbs", cores=1, memory="1GB", nodes=2), "unknown option nodes for cluster kind 'pbs'"),
        (dict(kind="local", queue="x"), "queue only apply to batch-scheduler kinds"),
        (dict(kind="lsf"), "unknown cluster kind 'lsf'"),
    ],
)
def test_option_errors(kwargs, message):
    kind = kwargs.pop("kind")
    with pytest.raises(MLMDError, match=message):
        if kind == "local":
            mc.cluster(kind, **kwargs)
        else:
            mc.job_script(kind, **kwargs)


def test_prologue_string_is_split_into_lines():
    script = mc.job_script("slurm", cores=1, memory="1GB", prologue="module load a\n\nmodule load b\n")
    assert split_script(script, "#SBATCH")[2] == ["module load a", "module load b"]


def test_job_script_for_local_is_an_error():
    with pytest.raises(MLMDError, match="local cluster submits no job script"):
        mc.job_script("local")


# ------------------------------------------------------------------------------------------- local


def test_local_cluster_through_callable_package():
    from distributed import Client

    assert callable(mlmd_lab.cluster) and mlmd_lab.cluster is mc
    with mlmd_lab.cluster("local", cores=2, memory="2GB", dashboard_address=":0") as c:
        assert type(c).__name__ == "LocalCluster"
        with pytest.raises(MLMDError, match="options go to cluster"):
            mc.client(c, cores=2)
        with mc.client(c) as client:
            assert isinstance(client, Client)
            info = client.scheduler_info()["workers"]
            assert len(info) == 2
            for w in info.values():
                assert w["nthreads"] == 1
                assert w["memory_limit"] == 1_000_000_000
                assert w["resources"] == {"cores": 1}
            assert client.submit(sum, [1, 2, 3], resources={"cores": 1}).result(timeout=30) == 6


# ------------------------------------------------------------------------------------------- MPI


def fake_launcher(folder: Path, name: str, version_text: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{version_text}\nEOF\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_mpi_flavour_detection(tmp_path):
    mpi._flavour_of.cache_clear()
    ompi = fake_launcher(tmp_path, "mpirun-ompi", "mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org")
    mpich = fake_launcher(tmp_path, "mpirun-mpich", "HYDRA build details:\n    Version: 4.0")
    intel = fake_launcher(tmp_path, "mpirun-intel", "Intel(R) MPI Library for Linux* OS, Version 2021.9")
    odd = fake_launcher(tmp_path, "mpirun-odd", "something else")
    assert mpi.mpi_flavour(str(ompi)) == "openmpi"
    assert mpi.mpi_flavour(str(mpich)) == "mpich"
    assert mpi.mpi_flavour(str(intel)) == "intel"
    assert mpi.mpi_flavour(str(odd)) == "unknown"


def test_mpi_command_as_root_and_not(tmp_path, monkeypatch):
    mpi._flavour_of.cache_clear()
    ompi = str(fake_launcher(tmp_path, "mpirun", "mpirun (Open MPI) 4.1.4"))
    mpich = str(fake_launcher(tmp_path, "mpiexec.hydra", "HYDRA build details:"))
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "4"}
    for k in list(os.environ):
        if k.startswith(("SLURM_", "PBS_", "PJM_")) or k in ("NSLOTS", "NCPUS", "JOB_ID"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert mpi.mpi_command(["pw.x", "-in", "pw.in"], 4, launcher=ompi) == [
        ompi, "--allow-run-as-root", "--oversubscribe", "-n", "4", "pw.x", "-in", "pw.in"
    ]
    # more ranks than the allocation's cores: no --oversubscribe (Open MPI then refuses, as it should)
    assert mpi.mpi_command("cp2k.psmp", 8, launcher=ompi) == [ompi, "--allow-run-as-root", "-n", "8", "cp2k.psmp"]
    # MPICH needs neither flag
    assert mpi.mpi_command("pw.x", 4, launcher=mpich, extra=["-bind-to", "core"]) == [
        mpich, "-bind-to", "core", "-n", "4", "pw.x"
    ]

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert mpi.mpi_command("pw.x", 2, launcher=ompi) == [ompi, "--oversubscribe", "-n", "2", "pw.x"]
    assert mpi.mpi_command("pw.x", 2, launcher=ompi, oversubscribe=False) == [ompi, "-n", "2", "pw.x"]
    assert mpi.mpi_command("pw.x", 2, launcher=ompi, as_root=True, oversubscribe=False)[1] == "--allow-run-as-root"
    assert mpi.mpi_command("pw.x", 2, launcher=ompi, flavour="mpich") == [ompi, "-n", "2", "pw.x"]

    with pytest.raises(MLMDError, match="MPI launcher 'no-such-mpirun' not found on PATH"):
        mpi.mpi_command("pw.x", 2, launcher="no-such-mpirun")
    with pytest.raises(MLMDError, match="n_ranks=0 must be a whole number >= 1"):
        mpi.mpi_command("pw.x", 0, launcher=ompi)


@pytest.mark.parametrize(
    ("env", "cores", "scheduler", "source"),
    [
        ({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "6", "PBS_JOBID": "x", "PBS_NCPUS": "2"}, 6, "slurm",
         "SLURM_CPUS_ON_NODE"),
        ({"PBS_JOBID": "1.srv", "PBS_NCPUS": "12"}, 12, "pbs", "PBS_NCPUS"),
        ({"PBS_JOBID": "1.srv", "NCPUS": "8"}, 8, "pbs", "NCPUS"),
        ({"PBS_JOBID": "1.srv", "PBS_NP": "3"}, 3, "pbs", "PBS_NP"),
        ({"JOB_ID": "5", "NSLOTS": "5"}, 5, "sge", "NSLOTS"),
        ({"PJM_JOBID": "9", "PJM_MPI_PROC": "48"}, 48, "pjm", "PJM_MPI_PROC"),
        ({"NSLOTS": "5", "OMP_NUM_THREADS": "1"}, None, None, "sched_getaffinity"),
    ],
)
def test_allocation_from_environment(env, cores, scheduler, source):
    a = mpi.allocation(env)
    assert (a.scheduler, a.source) == (scheduler, source)
    assert a.cores == (cores if cores is not None else len(os.sched_getaffinity(0)))
    assert mpi.allocation_cores(env) == a.cores


def test_run_mpi_with_mpich_from_the_venv(tmp_path):
    launcher = Path(PY).parent / "mpirun"
    if not launcher.exists() or mpi.mpi_flavour(str(launcher)) != "mpich":
        pytest.skip(f"no MPICH mpirun next to {PY} (pip install mpich)")
    code = "import os; os.write(1, f\"rank {os.environ['PMI_RANK']} of {os.environ['PMI_SIZE']}\\n\".encode())"
    proc = mpi.run_mpi([PY, "-c", code], n_ranks=2, launcher=str(launcher), cwd=tmp_path, log="mpi.log")
    assert proc.returncode == 0
    assert sorted(line for line in (tmp_path / "mpi.log").read_text().splitlines() if line.startswith("rank")) == [
        "rank 0 of 2", "rank 1 of 2"
    ]
    with pytest.raises(MLMDError, match="MPI run failed with exit code 3"):
        mpi.run_mpi([PY, "-c", "import sys; sys.exit(3)"], n_ranks=1, launcher=str(launcher), cwd=tmp_path)


# ------------------------------------------------------------------------------------------- real workers


def _worker_info_task():
    """A task reporting where it ran and under which job (a local function: sent by value, as the test module
    cannot be imported on the workers)."""

    def worker_info():
        import os
        import socket
        import sys

        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "python": sys.executable,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "pjm_job_id": os.environ.get("FAKE_PJM_JOBID"),
        }

    return worker_info


def _run_on_each_worker(client, n_workers: int) -> list[dict]:
    client.wait_for_workers(n_workers, timeout=60)
    workers = sorted(client.scheduler_info()["workers"])
    assert len(workers) == n_workers
    task = _worker_info_task()
    futures = [client.submit(task, workers=[w], pure=False, allow_other_workers=False) for w in workers]
    return [f.result(timeout=60) for f in futures]


FAKE_PJSUB = """#!/usr/bin/env bash
# Fake pjsub: checks the #PJM header like PJM would parse it, runs the script in the background.
set -eu
script=$1
state=%(state)s
exec 9>"$state/lock"; flock 9   # dask-jobqueue submits jobs concurrently: number them one at a time
n=$(( $(cat "$state/counter" 2>/dev/null || echo 100) + 1 )); echo $n > "$state/counter"
exec 9>&-
grep -q '^#PJM -L "elapse=[0-9]*:[0-5][0-9]:[0-5][0-9]"$' "$script" || {
  echo "[ERR.] PJM 0049 pjsub elapse is invalid." >&2; exit 1; }
cp "$script" "$state/job-$n.sh"
# (like a real scheduler, run a copy: dask-jobqueue deletes its temporary script right after submitting)
FAKE_PJM_JOBID=$n setsid bash "$state/job-$n.sh" > "$state/job-$n.out" 2>&1 < /dev/null &
echo $! > "$state/job-$n.pid"
echo "[INFO] PJM 0000 pjsub Job $n submitted."
"""

FAKE_PJDEL = """#!/usr/bin/env bash
state=%(state)s
for id in "$@"; do
  pid=$(cat "$state/job-$id.pid") || { echo "[ERR.] PJM 0260 pjdel Job $id does not exist." >&2; exit 1; }
  # the job runs in its own session (setsid): end its process group, never anything else
  if [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ]; then kill -TERM -- "-$pid" 2>/dev/null || true; fi
  echo "$id" >> "$state/deleted"
  echo "[INFO] PJM 0100 pjdel Accepted job $id."
done
"""


@pytest.mark.slow
def test_pjm_cluster_end_to_end_with_fake_pjsub(tmp_path, monkeypatch):
    """PJMCluster's submit / job-id parsing / cancel path with stand-in pjsub and pjdel (no real PJM here)."""
    from distributed import Client

    bindir, state = tmp_path / "bin", tmp_path / "state"
    bindir.mkdir()
    state.mkdir()
    for name, text in (("pjsub", FAKE_PJSUB), ("pjdel", FAKE_PJDEL)):
        (bindir / name).write_text(text % {"state": shlex.quote(str(state))})
        (bindir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")

    c = mc.cluster("pjm", cores=1, memory="1GB", queue="debug-o", account="gz00", walltime="00:05:00",
                   interface="lo", jobs=2, scheduler_options={"dashboard_address": ":0"})
    try:
        with Client(c) as client:
            infos = _run_on_each_worker(client, 2)
        job_ids = sorted(job.job_id for job in c.workers.values())
        assert job_ids == ["101", "102"]
        assert sorted(i["pjm_job_id"] for i in infos) == job_ids
        assert all(i["python"] == PY for i in infos)
        header = (state / "job-101.sh").read_text()
        assert '#PJM -L "rscgrp=debug-o"' in header and "#PJM -g gz00" in header
    finally:
        c.close()
    assert sorted((state / "deleted").read_text().split()) == ["101", "102"]
    for job_id in ("101", "102"):
        pid = int((state / f"job-{job_id}.pid").read_text())
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists()


def _squeue(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def _wait_no_jobs(name: str, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    left = _squeue(name)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _squeue(name)
    return left


@pytest.fixture
def job_name(tmp_path, monkeypatch):
    """A unique job name; the test runs in tmp_path, where sbatch/qsub put the jobs' default output files."""
    monkeypatch.chdir(tmp_path)
    name = f"mlmd-test-{uuid.uuid4().hex[:8]}"
    yield name
    if shutil.which("scancel"):  # never leave jobs queued, even when the test failed
        subprocess.run(["scancel", "-n", name], capture_output=True)


@pytest.mark.slow
def test_slurm_cluster_end_to_end(slurm, job_name, tmp_path):
    """SLURMCluster through mlmd_lab.cluster: 2 jobs, a task on each, distinct job ids, nothing left queued."""
    from distributed import Client

    c = mc.cluster("slurm", cores=1, memory="1GB", queue="debug", interface="lo", walltime="00:10:00",
                   job_name=job_name, log_directory=str(tmp_path / "logs"), jobs=2,
                   scheduler_options={"dashboard_address": ":0"})
    try:
        with Client(c) as client:
            infos = _run_on_each_worker(client, 2)
        job_ids = sorted(job.job_id for job in c.workers.values())
        assert len(set(job_ids)) == 2
        assert sorted(i["slurm_job_id"] for i in infos) == job_ids
        assert len({i["pid"] for i in infos}) == 2
        assert all(i["python"] == PY for i in infos)
        assert all(i["host"] == socket.gethostname() for i in infos)
        running = {line.split()[0] for line in _squeue(job_name)}
        assert running == set(job_ids)
    finally:
        c.close()
    assert _wait_no_jobs(job_name) == []


@pytest.mark.slow
def test_slurm_task_runs_mpi_inside_its_allocation(slurm, job_name):
    """A task on a 2-core Slurm job launches `mpirun -n <allocation cores>` (Open MPI as root, and MPICH)."""
    from distributed import Client

    launchers = [p for p in ("/usr/bin/mpirun.openmpi", str(Path(PY).parent / "mpirun")) if Path(p).exists()]
    if not launchers:
        pytest.skip("no mpirun (apt-get install openmpi-bin, or pip install mpich)")
    code = (  # one write() per line: the ranks share the output pipe
        "import os; e = os.environ; os.write(1, f\"rank {e.get('OMPI_COMM_WORLD_RANK', e.get('PMI_RANK'))} "
        "{e['SLURM_JOB_ID']}\\n\".encode())"
    )

    def task(launcher):
        from mlmd_lab.cluster.mpi import allocation, mpi_command, run_mpi

        a = allocation()
        proc = run_mpi([sys.executable, "-c", code], launcher=launcher)
        return a, mpi_command("x", a.cores, launcher=launcher), proc.stdout

    c = mc.cluster("slurm", cores=2, processes=1, memory="1GB", queue="debug", interface="lo",
                   walltime="00:10:00", job_name=job_name, jobs=1, scheduler_options={"dashboard_address": ":0"})
    try:
        with Client(c) as client:
            client.wait_for_workers(1, timeout=60)
            job_id = next(iter(c.workers.values())).job_id
            for launcher in launchers:
                future = client.submit(task, launcher, pure=False, resources={"cores": 2})
                a, cmd, out = future.result(timeout=60)
                assert (a.cores, a.scheduler, a.job_id) == (2, "slurm", job_id)
                if mpi.mpi_flavour(launcher) == "openmpi":
                    assert "--allow-run-as-root" in cmd and "--oversubscribe" in cmd
                ranks = sorted(line for line in out.splitlines() if line.startswith("rank"))
                assert ranks == [f"rank 0 {job_id}", f"rank 1 {job_id}"], (launcher, out)
    finally:
        c.close()
    assert _wait_no_jobs(job_name) == []


@pytest.mark.slow
def test_pbs_cluster_end_to_end_through_slurm_torque_wrappers(slurm, job_name):
    """PBSCluster end to end through Slurm's PBS-compatible qsub/qdel (Debian slurm-wlm-torque).

    This covers the PBS code path of dask-jobqueue and mlmd_lab only (job script, qsub submission, job-id
    parsing, qdel cancellation), not a real PBS Pro / OpenPBS / Torque server: the wrapper translates
    ``-N``, ``-q``, ``-l select=1:ncpus=N:mem=M`` and ``-l walltime=`` into Slurm options (checked below with
    ``scontrol``) and ignores what it does not know.
    """
    from distributed import Client

    if shutil.which("qsub") is None or "slurm" not in Path(shutil.which("qsub")).resolve().read_text(errors="ignore"):
        pytest.skip("Slurm's qsub wrapper not installed: apt-get install slurm-wlm-torque")
    c = mc.cluster("pbs", cores=1, memory="1GB", queue="debug", interface="lo", walltime="00:10:00",
                   job_name=job_name, jobs=2, scheduler_options={"dashboard_address": ":0"})
    try:
        with Client(c) as client:
            infos = _run_on_each_worker(client, 2)
        job_ids = sorted(job.job_id for job in c.workers.values())
        assert len(set(job_ids)) == 2
        assert sorted(i["slurm_job_id"] for i in infos) == job_ids
        assert all(i["python"] == PY for i in infos)
        shown = subprocess.run(["scontrol", "show", "job", job_ids[0]], capture_output=True, text=True).stdout
        assert f"JobName={job_name}" in shown
        assert "Partition=debug" in shown
        assert "TimeLimit=00:10:00" in shown
        assert "cpu=1,mem=954M" in shown  # select=1:ncpus=1:mem=954MB
    finally:
        c.close()
    assert _wait_no_jobs(job_name) == []


def test_documented_profiles_example_is_valid(tmp_path):
    from mlmd_lab.cluster import profiles as profiles_module

    doc = profiles_module.__doc__
    block = doc[doc.index("::\n") + 3 : doc.index("Every key of a profile")]
    path = tmp_path / "clusters.toml"
    path.write_text(textwrap.dedent(block))
    loaded = mc.load_profiles(path)
    assert sorted(loaded) == ["lab-slurm", "wisteria"]
    script = mc.job_script(profile="wisteria", config_file=path)
    assert '#PJM -L "rscgrp=regular-o"' in script and "#PJM -g gz00" in script
    script = mc.job_script(profile="lab-slurm", config_file=path)
    assert "#SBATCH --constraint=skylake" in script and "module load apptainer" in script
