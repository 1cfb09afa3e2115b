"""Shared fixtures: a real MongoDB-wire server over a socket, and the external sample data.

The server is ``$MLMD_TEST_MONGODB_URI`` when set (e.g. a real mongod), else the embedded SecantusDB
server started in a temporary folder for the test session. Each test gets its own database, dropped after.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Every wait below is event-based; its ceiling is a hang guard, scaled for machines ~3x slower than the ones the
#: suite was written on (CI machines of this kind differ that much). Never a timing assertion.
CEILING_SCALE = float(os.environ.get("MLMD_TEST_CEILING_SCALE", "3"))
EXTERNAL = (ROOT / ".." / "shared" / "external").resolve()

# One JAX compilation cache for this test session, shared with the processes tests start (notebook kernels, dask
# workers, the CLI): a program compiled by one test is loaded by the next that compiles the same one. It starts
# empty, so a run never profits from an earlier run (suite timings stay those of a clean machine), and it never
# touches the user's ~/.cache/mlmd_lab/jax. Set before any test module imports mlmd_lab.
if "MLMD_JAX_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _jax_cache = tempfile.mkdtemp(prefix="mlmd-test-jax-cache-")
    os.environ["MLMD_JAX_CACHE"] = _jax_cache
    atexit.register(shutil.rmtree, _jax_cache, True)


#: The longest tests (seconds in a clean suite on 2 cores, --durations of the run of 2026-12-06), started first:
#: xdist hands tests to the workers in collection order, so a 6-minute test collected last kept one worker busy
#: while the other idled (longest-first is the classic remedy). Only the order changes; a stale entry costs nothing.
LONGEST_FIRST = (
    "test_notebooks.py::test_notebook_executes[04_md_analysis.ipynb]",  # 121 s
    "test_quickstart.py::test_quickstart_notebook_in_the_browser",  # 110 s (389 s before PySCF ran on one thread)
    "test_slhmc_dft.py::test_qe_reference_run_survives_sigkill_and_repeats_no_dft",  # 76 s
    "test_label.py::test_label_20_si8_through_slurm_survives_a_killed_worker",  # 71 s
    "test_train_ensemble.py::test_md_thresholds_on_the_calibrated_uncertainty",  # 64 s
    "test_md.py::test_water_run_gives_sensible_structure_diffusion_and_spectrum",  # 63 s
    "test_learn.py::test_loop_on_emt_copper_ends_with_a_better_model_than_its_seed_model",  # 58 s
    "test_md.py::test_npt_pressure_and_volume_fluctuations",  # 48 s
    "test_slhmc.py::test_learning_phase_raises_the_acceptance_of_a_potential_trained_on_30_frames",  # 44 s
    "test_autobuild.py::test_autobuild_with_real_qe_writes_the_report_and_computes_the_checks",  # 43 s
)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (scripts/test.sh runs two workers), every test on the one real Slurm runs in one worker
    (``--dist loadgroup``): their fixtures start Slurm and cancel all its jobs when done. The longest tests
    (:data:`LONGEST_FIRST`) are moved to the front."""
    for item in items:
        if "slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("/")[-1], len(rank)))


def pytest_collection_finish(session):
    """Under ``--dist loadgroup`` (in each xdist worker) a test marked ``xdist_group`` must carry its group in its
    node id: that suffix is how pytest-xdist sends a group to one worker. Groups were ignored without a word twice:
    pytest 9.2 no longer reads the node id pytest-xdist 3.8 rewrites (pyproject.toml pins pytest below 9.2), and the
    Slurm marks were added after pytest-xdist had read the marks (hence ``tryfirst`` above). Stop the run with the
    reason instead of running the Slurm tests in two workers at once."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        message = (f"pytest-xdist's --dist loadgroup did not group {len(lost)} tests (e.g. {lost[0]}): install the "
                   f"pytest and pytest-xdist that pyproject.toml and scripts/constraints.txt ask for (bash "
                   f"scripts/test.sh does; this is pytest {pytest.__version__}), and add xdist_group marks in a "
                   "tryfirst hook or as decorators")
        print(message, file=sys.__stderr__, flush=True)  # a worker's exception reaches the log as an xdist crash
        raise pytest.UsageError(message)


def external(sub: str = "") -> Path:
    """Path inside ../shared/external; skips the test (with the reason) if the folder is absent."""
    path = EXTERNAL / sub
    if not path.exists():
        pytest.skip(f"real sample data not found at {path} (../shared/external is only in this workplace)")
    return path


def water_frames(n: int, seed: int = 0, shift_per_atom: float = 0.0):
    """``n`` boxes of four rattled water molecules (12 atoms, 6 Å cubic cell) labelled by ASE's EMT, energies
    raised by ``shift_per_atom`` eV/atom: the same physics in another DFT energy zero."""
    import numpy as np
    from ase import Atoms
    from ase.build import molecule
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = Atoms(cell=[6.0, 6.0, 6.0], pbc=True)
        for x in (1.5, 4.5):
            for y in (1.5, 4.5):
                water = molecule("H2O")
                water.translate([x, y, 3.0])
                atoms += water
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy + shift_per_atom * len(atoms), forces=forces)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory):
    uri = os.environ.get("MLMD_TEST_MONGODB_URI")
    if uri:
        yield uri
        return
    from mlmd_lab.db.server import EmbeddedServer

    server = EmbeddedServer(tmp_path_factory.mktemp("embedded-db"))
    info = server.ensure_running(register=False)
    yield info.uri
    server.stop()


@pytest.fixture
def db(mongo_uri):
    from mlmd_lab.db import connect

    database = connect(mongo_uri, database=f"test_{uuid.uuid4().hex[:12]}")
    yield database
    database.drop()
    database.close()


def random_cu_s_cell(seed: int = 0):
    """A Cu8S4 cell (6.9 x 4.6 x 4.6 Å, periodic) on a 2.3 Å grid with 0.1 Å Gaussian noise: the structure the
    random Cu–S models of :func:`random_cu_s_model` are evaluated on."""
    import numpy as np
    from ase import Atoms

    rng = np.random.default_rng(seed)
    grid = np.array([(i, j, k) for i in range(3) for j in range(2) for k in range(2)], float) * 2.3
    return Atoms("Cu8S4", positions=grid + rng.normal(0, 0.1, grid.shape), cell=[6.9, 4.6, 4.6], pbc=True)


def random_cu_s_model(seed: int = 0, hidden: tuple[int, ...] = (5, 5)):
    """A random Cu–S HDNNP (cutoff 4 Å, ``hidden`` nodes) with perturbed weights and wide random scaling statistics.

    The statistics are random rather than from ``fit_scaling`` (seconds of eager JAX); their wide min/max keep
    test structures inside the "training range", so no extrapolation warnings.
    """
    import numpy as np

    from mlmd_lab.potentials import HDNNP

    model = HDNNP.create(["Cu", "S"], cutoff=4.0, hidden=hidden, seed=seed)
    rng = np.random.default_rng(seed + 10)
    model.networks = {e: [(W + rng.normal(0, 0.3, np.shape(W)), b + rng.normal(0, 0.1, np.shape(b)))
                          for W, b in layers] for e, layers in model.networks.items()}
    for e, stats in model.scaling_stats.items():
        n = len(stats)
        model.scaling_stats[e] = np.stack([-1e3 * rng.uniform(1, 2, n), 1e3 * rng.uniform(1, 2, n),
                                           rng.uniform(0, 3, n), rng.uniform(0.5, 2.0, n)], axis=1)
    model._cache.clear()
    return model


def wait_until(condition, timeout: float = 120.0, what: str = "condition") -> None:
    """Poll ``condition`` until true; fail after a generous deadline (a hang guard, not a timing assertion)."""
    import time

    deadline = time.monotonic() + timeout * CEILING_SCALE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def slurm():
    """A running single-node Slurm (scripts/start_slurm.sh); left running afterwards, for whoever comes next."""
    import shutil
    import subprocess

    if shutil.which("sbatch") is None:
        pytest.skip("Slurm not installed: apt-get install slurmctld slurmd slurm-client munge (apt-packages.txt)")
    if os.geteuid() != 0:
        pytest.skip("starting the CI Slurm needs root (scripts/start_slurm.sh starts munged, slurmctld, slurmd)")
    proc = subprocess.run([str(ROOT / "scripts" / "start_slurm.sh")], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"scripts/start_slurm.sh failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Real-browser tests: a session JupyterLab on 127.0.0.1 and Debian's chromium driven by Playwright
# (../shared/guides/browser-testing.md). Never `playwright install`: it downloads a browser and fails offline.

CHROMIUM = os.environ.get("MLMD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("MLMD_TEST_ARTIFACTS", ROOT / "test-artifacts"))
KERNEL_READY_JS = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const s = w && w.sessionContext;
    return !!(s && s.isReady && s.session && s.session.kernel && s.session.kernel.connectionStatus === 'connected'
              && s.kernelDisplayStatus === 'idle'); }"""
# Run All has ended, as a state: "done" (every prompt numbered, kernel idle), "error" (kernel idle with a traceback
# shown: JupyterLab then leaves the later cells unrun, so waiting for "done" would only hang), "dead" (the kernel
# died or restarts), or false while cells still run.
ALL_RUN_JS = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const s = w && w.sessionContext;
    if (!s) return false;
    if (['dead', 'restarting', 'autorestarting'].includes(s.kernelDisplayStatus)) return 'dead';
    if (s.kernelDisplayStatus !== 'idle') return false;
    const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
    if (prompts.length > 0 && prompts.every(t => /^\\[\\d+\\]:$/.test(t))) return 'done';
    const stderr = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']";
    const errors = [...document.querySelectorAll(stderr)].filter(e => e.textContent.includes('Traceback'));
    return errors.length > 0 ? 'error' : false; }"""
# Run All has started: some prompt shows "[*]" or a number.
STARTED_JS = """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
    .some(p => /^\\[(\\*|\\d+)\\]:$/.test(p.textContent.trim()))"""
IDLE_JS = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    return !!(w && w.sessionContext && w.sessionContext.kernelDisplayStatus === 'idle'); }"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def lab(tmp_path_factory, mongo_uri):
    """A JupyterLab server for the session: ``{"url", "token", "root"}``; kernels see ``MLMD_MONGODB_URI``."""
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (scripts/bootstrap.sh installs it)")
    root = tmp_path_factory.mktemp("lab-root")
    settings = tmp_path_factory.mktemp("lab-settings")
    (settings / "overrides.json").write_text((ROOT / "mlmd_lab" / "jupyter" / "overrides.json").read_text())
    port, token = _free_port(), os.urandom(12).hex()
    env = {**os.environ, "MLMD_MONGODB_URI": mongo_uri, "JUPYTERLAB_SETTINGS_DIR": str(settings / "user"),
           "JUPYTERLAB_WORKSPACES_DIR": str(settings / "workspaces"), "PYTHONUNBUFFERED": "1"}
    log = open(root / "jupyterlab.log", "w")  # noqa: SIM115 - closed after the server stops
    # The Binder/hub config, tested here, plus one test-only setting: the server closes a kernel websocket whose
    # browser answered no ping for 90 s (jupyter_server's default), and replies in flight are then lost (cells
    # stay "[*]"). On two cores shared by a JAX kernel, another test worker and a software-WebGL Chromium, the
    # page can be that slow to read its socket; a person's browser on a hub is not starved like that.
    config = settings / "jupyter_server_config.py"
    config.write_text(f"exec(open({str(ROOT / 'binder' / 'jupyter_server_config.py')!r}).read())\n"
                      "c.ServerApp.tornado_settings = {'ws_ping_timeout': 3_600_000}  # ms\n")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", f"--LabApp.app_settings_dir={settings}",
           f"--config={config}"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                pytest.fail(f"JupyterLab did not start; its log:\n{(root / 'jupyterlab.log').read_text()[-3000:]}")
            time.sleep(0.2)
    yield {"url": url, "token": token, "root": root}
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def browser():
    """A persistent Chromium context (Debian's chromium through Playwright), skipped with the reason if absent."""
    import tempfile

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; scripts/bootstrap.sh does as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="mlmd-chromium-"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(30_000 * CEILING_SCALE)  # Playwright's 30 s, scaled (see CEILING_SCALE)
        yield context
        context.close()


class NotebookPage:
    """A notebook open in the browser. ``console_errors`` collects console errors and page errors as they come."""

    def __init__(self, page, lab: dict, path: str, label: str) -> None:
        self.page = page
        self.lab = lab
        self.path = path
        self.label = label
        self.console_errors: list[str] = []
        page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))
        page.on("pageerror", lambda exc: self.console_errors.append(f"page error: {exc}"))

    def screenshot(self, name: str, locator=None) -> Path:
        """Save a PNG of the page (or of ``locator``) as test-artifacts/browser/<test>-<name>.png."""
        out = ARTIFACTS / "browser" / f"{self.label}-{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        (locator or self.page).screenshot(path=str(out))
        return out

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until the kernel is idle again (after a click started work in Python)."""
        self.page.wait_for_timeout(300)
        self.page.wait_for_function(IDLE_JS, timeout=timeout * 1000 * CEILING_SCALE)

    def cell_errors(self) -> list[str]:
        """Texts of error outputs (tracebacks) shown in the notebook."""
        return self.page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
                                 ", .jp-RenderedText[data-mime-type='application/vnd.jupyter.error']").all_inner_texts()

    def prompts(self) -> list[str]:
        """The input prompts of the code cells ("[3]:" ran, "[*]:" runs, "[ ]:" never ran)."""
        return [t.strip() for t in self.page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()]

    def output_text(self) -> str:
        """Every output area's text, in cell order (what a user would read)."""
        return "\n".join(self.page.locator(".jp-OutputArea").all_inner_texts())

    def assert_no_console_errors(self, ignore: tuple[str, ...] = ()) -> None:
        errors = [e for e in self.console_errors if not any(i in e for i in ignore)]
        assert not errors, "browser console errors:\n" + "\n".join(errors)


def distinct_colours(locator) -> int:
    """Number of distinct RGB colours in a screenshot of ``locator`` (a blank canvas has 1-2)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(locator.screenshot())).convert("RGB")
    return len(image.getcolors(maxcolors=1 << 24))


def drawn_colours(locator, timeout: float = 60.0, at_least: int = 11) -> int:
    """Distinct colours of ``locator``'s screenshot once it has drawn: polled until ``at_least`` colours show or a
    generous ceiling passes (a WebGL canvas draws its first frame late on a loaded machine); returns the count."""
    import time

    deadline = time.monotonic() + timeout * CEILING_SCALE
    while True:
        colours = distinct_colours(locator)
        if colours >= at_least or time.monotonic() > deadline:
            return colours
        locator.page.wait_for_timeout(500)


@pytest.fixture
def run_notebook(lab, browser, request):
    """``run_notebook(cells, name=None, timeout=240) -> NotebookPage``: write a notebook of these code cells, open
    it in JupyterLab, Run All through the menu and wait until every cell has run (cell errors fail the test)."""
    import json
    import re
    import time
    import urllib.request
    import warnings

    opened: list[NotebookPage] = []
    label = request.node.name.replace("[", "-").replace("]", "").replace("/", "_")

    def lab_log() -> str:
        log = lab["root"] / "jupyterlab.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(none)"

    def server_kernel_state(nb_name: str) -> str | None:
        """The kernel's execution state as the Jupyter server knows it (the page's copy can be stale)."""
        try:
            with urllib.request.urlopen(f"{lab['url']}/api/sessions?token={lab['token']}", timeout=10) as r:
                sessions = json.load(r)
        except OSError:
            return None
        states = [s["kernel"]["execution_state"] for s in sessions if s.get("path", "").endswith(nb_name)]
        return states[-1] if states else None

    def wait_all_run(nbp: NotebookPage, ceiling_s: float) -> str | None:
        """Poll until Run All ends: ALL_RUN_JS's state, or "lost" when the server's kernel is idle and the last
        cell is numbered while the page still shows "[*]" for earlier cells (or a busy kernel): JupyterLab dropped
        the kernel websocket and lost replies (its reconnect replays only what the server buffered); also "lost" when
        the page shows "[*]" cells while the server's kernel has sat idle for a minute (x CEILING_SCALE). None on
        timeout."""
        deadline, stale_since, idle_since = time.monotonic() + ceiling_s, None, None
        while time.monotonic() < deadline:
            state = nbp.page.evaluate(ALL_RUN_JS)
            if state:
                return state
            prompts = nbp.prompts()
            server_idle = server_kernel_state(nbp.path) == "idle"
            # the last cell ran (the kernel runs in order and aborts the queue on an error), yet ALL_RUN_JS did not
            # see "done": the page shows "[*]" or a busy kernel that the server says is idle
            stale = bool(prompts and re.fullmatch(r"\[\d+\]:", prompts[-1]) and server_idle)
            stale_since = (stale_since or time.monotonic()) if stale else None
            if stale_since and time.monotonic() - stale_since > 15 * CEILING_SCALE:
                return "lost"
            # the page still waits on cells ("[*]"), but the server's kernel has been idle for a minute: a kernel
            # with queued requests is never idle that long (cells that wait on a thread keep it busy), so the page
            # lost the replies (or its requests) when its websocket dropped
            waiting = any(p == "[*]:" for p in prompts)
            idle_since = (idle_since or time.monotonic()) if (server_idle and waiting) else None
            if idle_since and time.monotonic() - idle_since > 60 * CEILING_SCALE:
                return "lost"
            nbp.page.wait_for_timeout(1000)
        return None

    def _run(cells: list[str], *, name: str | None = None, timeout: float = 240, retry: bool = True) -> NotebookPage:
        nb_name = f"{name or label}.ipynb"
        notebook = {"nbformat": 4, "nbformat_minor": 5, "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "cells": [{"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None,
                       "id": f"c{i}"} for i, src in enumerate(cells)]}
        (lab["root"] / nb_name).write_text(json.dumps(notebook))
        page = browser.new_page()
        nbp = NotebookPage(page, lab, nb_name, label)
        opened.append(nbp)
        page.goto(f"{lab['url']}/lab/tree/{nb_name}?token={lab['token']}&reset")
        page.wait_for_function(KERNEL_READY_JS, timeout=90_000 * CEILING_SCALE)
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()
        try:  # a click that landed before the notebook was ready starts nothing: then run all by the command
            page.wait_for_function(STARTED_JS, timeout=30_000 * CEILING_SCALE, polling=250)
        except Exception:
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        ceiling_s = timeout * CEILING_SCALE
        state = wait_all_run(nbp, ceiling_s)
        nbp.screenshot("after-run-all")
        if state is None:
            pytest.fail(f"Run All of {nb_name} did not end within {ceiling_s:.0f} s; prompts {nbp.prompts()}; "
                        f"last outputs:\n{nbp.output_text()[-3000:]}\nJupyterLab log:\n{lab_log()}")
        if state == "lost":
            # The kernel ran every cell, but the page missed replies (and maybe outputs), so what it shows cannot be
            # checked. Run the notebook again once in a new page, saying so; twice in a row fails.
            detail = f"prompts {nbp.prompts()}; JupyterLab log:\n{lab_log()}"
            assert retry, f"JupyterLab lost kernel messages of {nb_name} twice (the websocket dropped); {detail}"
            warnings.warn(f"JupyterLab lost kernel messages of {nb_name} (the websocket dropped); running it "
                          f"again in a new page. {detail}", stacklevel=2)
            shutdown(nbp)
            opened.remove(nbp)
            return _run(cells, name=name, timeout=timeout, retry=False)
        errors = [e for e in nbp.cell_errors() if "Traceback" in e]
        assert not errors, "a notebook cell failed:\n" + "\n\n".join(errors)[-4000:]
        assert state == "done", (f"the kernel of {nb_name} is {state!r} after Run All; prompts {nbp.prompts()}; "
                                 f"last outputs:\n{nbp.output_text()[-3000:]}\nJupyterLab log:\n{lab_log()}")
        return nbp

    def shutdown(nbp: NotebookPage) -> None:
        """Shut the notebook's kernel down and close its page."""
        try:
            with urllib.request.urlopen(f"{lab['url']}/api/sessions?token={lab['token']}", timeout=5) as r:
                sessions = json.load(r)
            for s in sessions:
                if s.get("path", "").endswith(nbp.path):
                    req = urllib.request.Request(f"{lab['url']}/api/sessions/{s['id']}?token={lab['token']}",
                                                 method="DELETE")
                    urllib.request.urlopen(req, timeout=10).close()
        except OSError:
            pass
        nbp.page.close()

    yield _run
    for nbp in opened:  # shut the kernels down so the session's lab does not pile them up
        shutdown(nbp)
