"""Structure of the Apptainer definition files in containers/ (apptainer itself is not needed).

Checks per file: the ``Bootstrap``/``From`` header (a docker base with a fixed tag), the sections ``%post``,
``%environment``, ``%runscript``, ``%labels`` and ``%test`` (present, non-empty, sane), ``%files`` sources that
exist, build arguments that are declared; pip installs constrained by (or pinned equal to) scripts/constraints.txt;
Debian packages of scripts/apt-packages.txt pinned to the versions installed here; VASP built from a user-given
tarball with nothing licensed in the repository.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
DEFS = ["mlmd_lab-cpu.def", "mlmd_lab-cuda.def", "quantum-espresso.def", "vasp.def"]
REQUIRED = ("post", "environment", "runscript", "labels", "test")


def parse_def(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Header ``{key: value}`` and ``{section: body}`` of a definition file (comments dropped)."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.rstrip()
        if current is None and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if m := re.match(r"^%(\w+)\s*$", line):
            current = m.group(1)
            assert current not in sections, f"{path.name}: section %{current} twice"
            sections[current] = []
        elif current is None:
            m = re.match(r"^(\w+):\s*(\S.*)$", line)
            assert m, f"{path.name}: header line {line!r} is not 'Key: value'"
            header[m.group(1)] = m.group(2).strip()
        else:
            sections[current].append(line)
    return header, {k: "\n".join(v).strip() for k, v in sections.items()}


def logical_lines(script: str) -> list[str]:
    """Shell lines with backslash continuations joined and comments dropped."""
    out, buf = [], ""
    for line in script.splitlines():
        stripped = line.strip()
        if not buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        out.append((buf + stripped).strip())
        buf = ""
    return [ln for ln in out if ln]


def file_entries(sections: dict[str, str]) -> list[tuple[str, str]]:
    """``(source, destination)`` pairs of ``%files`` (a source may be a ``{{ ARG }}`` build argument)."""
    out = []
    for line in sections.get("files", "").splitlines():
        if line.strip():
            m = re.match(r"^\s*(\{\{\s*\w+\s*\}\}|\S+)\s+(\S+)\s*$", line)
            assert m, f"%files line {line!r} is not 'source destination'"
            out.append((m.group(1), m.group(2)))
    return out


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def apt_list() -> set[str]:
    path = ROOT / "scripts" / "apt-packages.txt"
    return {ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")}


def installed_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


@pytest.fixture(scope="module", params=DEFS)
def definition(request):
    path = CONTAINERS / request.param
    assert path.is_file(), f"{path} is missing"
    return path, *parse_def(path)


def test_header_and_required_sections(definition):
    path, header, sections = definition
    assert header.get("Bootstrap") == "docker", f"{path.name}: Bootstrap must be docker"
    base = header.get("From", "")
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base), f"{path.name}: From {base!r} needs image:tag"
    assert not base.endswith(":latest"), f"{path.name}: pin the base image tag, not latest"
    for name in REQUIRED:
        assert sections.get(name), f"{path.name}: %{name} missing or empty"
    unknown = set(sections) - {*REQUIRED, "files", "arguments", "help", "setup", "startscript"}
    assert not unknown, f"{path.name}: unknown sections {unknown}"
    assert sections["post"].splitlines()[0].strip() == "set -eu", f"{path.name}: %post must start with set -eu"
    assert sections["test"].splitlines()[0].strip() == "set -eu", f"{path.name}: %test must start with set -eu"
    assert re.search(r"^exec \S+", sections["runscript"], re.M), f"{path.name}: %runscript should exec a program"
    for line in sections["environment"].splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert re.match(r"^export \w+=\S", line), f"{path.name}: %environment line {line!r} is not 'export X=...'"
    labels = dict(line.strip().split(None, 1) for line in sections["labels"].splitlines() if line.strip())
    assert "org.opencontainers.image.title" in labels, f"{path.name}: label org.opencontainers.image.title missing"


def test_files_exist_and_build_arguments_are_declared(definition):
    path, header, sections = definition
    declared = {}
    for line in sections.get("arguments", "").splitlines():
        if line.strip():
            key, _, value = line.strip().partition("=")
            declared[key] = value
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", path.read_text()))
    assert used <= set(declared), f"{path.name}: build arguments {used - set(declared)} not in %arguments"
    for source, dest in file_entries(sections):
        assert dest.startswith("/"), f"{path.name}: %files destination {dest!r} must be absolute"
        if not source.startswith("{{"):
            assert (ROOT / source).exists(), f"{path.name}: %files source {source} does not exist in the repository"


def test_pip_installs_follow_constraints(definition):
    path, header, sections = definition
    pins = constraints()
    constraint_dests = {dest for src, dest in file_entries(sections) if src == "scripts/constraints.txt"}
    for line in logical_lines(sections["post"]):
        if not re.search(r"\bpip3? install\b", line):
            continue
        words = shlex.split(line)
        constrained = any(w in ("-c", "--constraint") and words[i + 1] in constraint_dests
                          for i, w in enumerate(words[:-1]))
        specs = [w for w in words[words.index("install") + 1:] if not w.startswith("-")
                 and w not in constraint_dests]
        for spec in specs:
            m = re.match(r"^([A-Za-z0-9_.-]+)(\[[\w,]+\])?==([\w.+-]+)$", spec)
            if m:
                name = m.group(1).lower().replace("_", "-")
                if name in pins:
                    assert pins[name] == m.group(3), f"{path.name}: {spec} differs from constraints.txt {pins[name]}"
            else:
                assert constrained, f"{path.name}: {spec!r} is neither pinned (==) nor installed with -c constraints"


def test_apt_packages_pinned_to_tested_versions(definition):
    path, header, sections = definition
    tested = apt_list()
    for line in logical_lines(sections["post"]):
        if not re.search(r"\bapt-get install\b", line):
            continue
        words = line.split()
        assert "-y" in words, f"{path.name}: apt-get install needs -y"
        assert "--no-install-recommends" in words, f"{path.name}: use --no-install-recommends"
        assert "apt-get update" in sections["post"], f"{path.name}: apt-get update missing"
        for word in words[words.index("install") + 1:]:
            if word.startswith("-"):
                continue
            name, _, version = word.partition("=")
            if name in tested:
                assert version, f"{path.name}: {name} (scripts/apt-packages.txt) must be pinned name=version"
                here = installed_version(name)
                if here is not None:
                    assert version == here, f"{path.name}: {name}={version}, but the tests ran with {here}"


def test_mlmd_lab_images_install_this_package_with_constraints():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    major_minor = tuple(int(x) for x in pyproject["project"]["requires-python"].lstrip(">=").split(".")[:2])
    for name, extra in (("mlmd_lab-cpu.def", None), ("mlmd_lab-cuda.def", "gpu")):
        header, sections = parse_def(CONTAINERS / name)
        m = re.match(r"python:(\d+)\.(\d+)", header["From"])
        assert m and (int(m.group(1)), int(m.group(2))) >= major_minor, f"{name}: Python older than requires-python"
        post = sections["post"]
        target = "/opt/mlmd_lab" + (f"[{extra}]" if extra else "")
        assert re.search(rf"pip install -c /opt/mlmd_lab/scripts/constraints.txt \"?{re.escape(target)}\"?(\s|$)",
                         post), f"{name}: must pip install {target} with the constraints"
        assert "rm -rf /opt/mlmd_lab" in post
    assert any("cuda12" in dep for dep in pyproject["project"]["optional-dependencies"]["gpu"])
    cuda_env = parse_def(CONTAINERS / "mlmd_lab-cuda.def")[1]["environment"]
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" in cuda_env
    assert "JAX_PLATFORMS=cpu" in parse_def(CONTAINERS / "mlmd_lab-cpu.def")[1]["environment"]


def test_vasp_builds_from_user_sources_and_ships_none():
    text = (CONTAINERS / "vasp.def").read_text()
    header, sections = parse_def(CONTAINERS / "vasp.def")
    assert "VASP_SOURCE=" in sections["arguments"]
    assert file_entries(sections) == [("{{ VASP_SOURCE }}", "/opt/src/vasp.tgz")]
    assert "rm -rf /opt/src" in sections["post"] and "test ! -e /opt/src" in sections["test"]
    assert "--build-arg VASP_SOURCE=" in text  # documented build command
    licensed = [p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts and p.is_file()
                and (re.match(r"vasp.*\.(tgz|tar\.gz|tar)$", p.name, re.I) or p.name == "POTCAR")]
    assert not licensed, f"licensed VASP files must not be in the repository: {licensed}"


def test_quantum_espresso_image_matches_the_recipe_defaults():
    from mlmd_lab.dft.recipes import QE_PSEUDO_DIR

    header, sections = parse_def(CONTAINERS / "quantum-espresso.def")
    assert f"ESPRESSO_PSEUDO={QE_PSEUDO_DIR}" in sections["environment"]
    assert "pw.x" in sections["runscript"] and "Si.pbe-rrkj.UPF" in sections["test"]


def test_readme_documents_build_and_prologues():
    text = (CONTAINERS / "README.md").read_text()
    for name in DEFS:
        assert name in text
    for phrase in ("apptainer build", "apptainer exec --nv", "module load apptainer", "MLMD_CONTAINER", "prologue",
                   "job_script_prologue", "python=", "--build-arg VASP_SOURCE"):
        assert phrase in text, f"containers/README.md should mention {phrase!r}"
