"""Job monitor: a dask / dask-jobqueue cluster at a glance, refreshed periodically, with scale buttons.

>>> cluster = mlmd_lab.cluster("slurm", queue="cpu", cores=16, memory="60GB", walltime="04:00:00")
>>> monitor = JobMonitor(cluster)        # or JobMonitor(client)
>>> monitor                              # display it                                    # doctest: +SKIP

Shows, every ``interval`` seconds (a background thread; :meth:`JobMonitor.stop` ends it, :meth:`close` too):

- jobs: for dask-jobqueue clusters (Slurm, PBS, SGE, PJM) each job with its scheduler job id, ``pending``
  (submitted, no worker connected yet) or ``running``; for a LocalCluster the workers requested and started;
- workers: name, host, threads, memory used / limit, tasks processing and held;
- tasks by state (``processing``, ``memory``, ``erred``, ``waiting``, ...), read on the scheduler with
  ``client.run_on_scheduler`` from ``dask_scheduler.tasks``; these are the tasks the scheduler holds now, i.e.
  those whose futures are still referenced (a released result is forgotten);
- failed tasks with their exception text (the task that raised, not the dependents that failed with it);
- buttons: +1 / −1 / scale to N (jobs for jobqueue clusters, workers for a LocalCluster) and adapt between a
  minimum and a maximum (``cluster.adapt``); scaling by hand switches adapt off;
- the dashboard link (:func:`dashboard_url`).

**Dashboard link on JupyterHub.** The dask dashboard listens on a port of the machine running the scheduler
(the single-user server), which the user's browser cannot reach directly under JupyterHub. When
``JUPYTERHUB_SERVICE_PREFIX`` is set (JupyterHub sets it in every single-user server), the link becomes
``{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status``: jupyter-server-proxy (installed with dask-labextension)
forwards it to ``localhost:{port}`` behind the hub's login. A scheduler on another host gives
``proxy/{host}:{port}/status`` (jupyter-server-proxy must allow that host). A ``distributed.dashboard.link``
already configured to go through a proxy is kept as it is.

DOM classes: ``mlmd-jobs`` (the widget), ``mlmd-jobs-status`` (last refresh), ``mlmd-jobs-message`` (outcome of
the last button), ``mlmd-jobs-summary`` (``mlmd-jobs-counts`` with ``data-workers``), ``mlmd-jobs-jobs`` (rows
``mlmd-jobs-job`` with ``data-state``), ``mlmd-jobs-workers`` (rows ``mlmd-jobs-worker``), ``mlmd-jobs-tasks``
(``mlmd-jobs-task-state`` with ``data-state``), ``mlmd-jobs-failed`` (rows ``mlmd-jobs-failed-task``),
``mlmd-jobs-dashboard`` (link ``mlmd-jobs-dashboard-link``), buttons ``mlmd-jobs-scale-up``, ``mlmd-jobs-scale-down``,
``mlmd-jobs-scale-to`` (with the number ``mlmd-jobs-scale-n``), ``mlmd-jobs-adapt`` (``mlmd-jobs-adapt-min``,
``mlmd-jobs-adapt-max``), ``mlmd-jobs-refresh``.
"""

from __future__ import annotations

import html
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import ipywidgets as widgets

from mlmd_lab.errors import MLMDError

#: Task states shown first, in this order (others follow alphabetically).
TASK_STATES = ("processing", "memory", "erred", "waiting", "queued", "no-worker", "released")

_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "0.0.0.0", "::1", "[::1]"}


def dashboard_url(client: Any, environ: Mapping[str, str] | None = None) -> str | None:
    """The dask dashboard link of ``client``, through jupyter-server-proxy under JupyterHub.

    Args:
        client: a ``distributed.Client``.
        environ: environment to read ``JUPYTERHUB_SERVICE_PREFIX`` from (default ``os.environ``).

    Returns ``client.dashboard_link`` outside JupyterHub; with ``JUPYTERHUB_SERVICE_PREFIX`` set,
    ``{prefix}proxy/{port}/status`` (``proxy/{host}:{port}/status`` for a scheduler on another host); None when the
    scheduler has no dashboard.
    """
    environ = os.environ if environ is None else environ
    try:
        link = client.dashboard_link
    except Exception:  # noqa: BLE001 (no scheduler info: no link)
        return None
    if not link:
        return None
    prefix = environ.get("JUPYTERHUB_SERVICE_PREFIX")
    if not prefix or "proxy/" in link:
        return link
    return proxied_dashboard_link(link, prefix)


def proxied_dashboard_link(link: str, prefix: str) -> str:
    """``{prefix}proxy/{port}/status`` for a dashboard ``link`` such as ``http://127.0.0.1:8787/status``.

    The host is kept (``proxy/{host}:{port}``) when it is not this machine; the path of ``link`` is kept.
    """
    parsed = urlparse(link)
    if parsed.port is None:
        raise MLMDError(f"dashboard link {link!r} has no port; set distributed.dashboard.link to a URL with one")
    host = parsed.hostname or ""
    here = host in _LOCAL_HOSTS or _is_this_machine(host)
    target = str(parsed.port) if here else f"{host}:{parsed.port}"
    path = parsed.path or "/status"
    return f"{prefix.rstrip('/')}/proxy/{target}{path}"


def _is_this_machine(host: str) -> bool:
    """True when ``host`` names an address of this machine (binding a socket to it works)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, address in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((address[0], 0))
            return True
        except OSError:
            continue
    return False


def _snapshot_function(max_failed: int):
    """A function for ``client.run_on_scheduler`` returning workers, task counts and failed tasks.

    Defined in a closure so cloudpickle sends it by value: a scheduler without mlmd_lab installed can run it.
    """

    def snapshot(dask_scheduler=None) -> dict:
        counts: dict[str, int] = {}
        failed = []
        for ts in list(dask_scheduler.tasks.values()):
            counts[ts.state] = counts.get(ts.state, 0) + 1
            blame = getattr(ts, "exception_blame", None)
            if ts.state == "erred" and (blame is None or blame is ts) and len(failed) < max_failed:
                failed.append({"key": str(ts.key), "exception": str(getattr(ts, "exception_text", "") or ""),
                               "traceback": str(getattr(ts, "traceback_text", "") or "")[-4000:]})
        workers = []
        for ws in list(dask_scheduler.workers.values()):
            memory = getattr(getattr(ws, "memory", None), "process", None)
            workers.append({"name": str(ws.name), "address": ws.address, "host": ws.host, "threads": ws.nthreads,
                            "memory": memory, "memory_limit": ws.memory_limit, "processing": len(ws.processing),
                            "in_memory": len(ws.has_what), "status": str(getattr(ws, "status", ""))})
        return {"tasks": counts, "failed": failed, "workers": workers, "time": time.time()}

    return snapshot


def _is_jobqueue(cluster: Any) -> bool:
    try:
        from dask_jobqueue.core import JobQueueCluster
    except ImportError:  # pragma: no cover (dask-jobqueue is a dependency)
        return False
    return isinstance(cluster, JobQueueCluster)


def jobs_of(cluster: Any, worker_names: set[str]) -> list[dict[str, Any]]:
    """Jobs (or planned workers) of a SpecCluster: name, job_id, state (``requested``, ``pending``, ``running``).

    ``worker_names``: names of the workers connected to the scheduler. A job is running when one of its workers
    (the job name, or job name + group suffix for several processes per job) is connected.
    """
    out = []
    spec = dict(getattr(cluster, "worker_spec", {}) or {})
    submitted = dict(getattr(cluster, "workers", {}) or {})
    for name, entry in spec.items():
        names = {str(name) + suffix for suffix in entry.get("group", [""])} if isinstance(entry, dict) else {str(name)}
        job = submitted.get(name)
        if names & worker_names:
            state = "running"
        elif job is not None:
            state = "pending"
        else:
            state = "requested"
        out.append({"name": str(name), "job_id": getattr(job, "job_id", None), "state": state})
    return out


class JobMonitor(widgets.VBox):
    """Status of a dask cluster (jobs, workers, tasks, failures) with scale buttons and the dashboard link.

    Args:
        cluster_or_client: a cluster (``LocalCluster``, a dask-jobqueue cluster, ...) or a ``distributed.Client``
            (scale buttons need ``client.cluster``; a client of a remote scheduler shows workers and tasks only).
        interval: seconds between refreshes (a background thread).
        start: start refreshing at once (else call :meth:`start`, or :meth:`refresh` by hand).
        max_failed: failed tasks listed at most.

    Attributes:
        snapshot: the last state read: ``workers`` (list of dicts), ``tasks`` ({state: count}), ``failed``
            (key, exception, traceback), ``jobs`` (see :func:`jobs_of`), ``dashboard`` (URL or None).
        refreshes: number of refreshes done.
    """

    def __init__(self, cluster_or_client: Any, *, interval: float = 2.0, start: bool = True,
                 max_failed: int = 20) -> None:
        from distributed import Client

        if not interval > 0:
            raise MLMDError(f"JobMonitor interval={interval} must be > 0 (seconds)")
        if isinstance(cluster_or_client, Client):
            self.client, self.cluster, self._owns_client = cluster_or_client, cluster_or_client.cluster, False
        elif hasattr(cluster_or_client, "scheduler_address"):
            self.cluster = cluster_or_client
            self.client = Client(cluster_or_client, set_as_default=False)
            self._owns_client = True
        else:
            raise MLMDError(f"JobMonitor needs a dask cluster or distributed.Client, not "
                            f"{type(cluster_or_client).__name__}: e.g. JobMonitor(mlmd_lab.cluster('local'))")
        self.interval = float(interval)
        self.snapshot: dict[str, Any] = {}
        self.refreshes = 0
        self._snapshot = _snapshot_function(max_failed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._build()
        self.refresh()
        if start:
            self.start()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        jobqueue = _is_jobqueue(self.cluster)
        unit = "job" if jobqueue else "worker"
        self.status = widgets.HTML("")
        self.status.add_class("mlmd-jobs-status")
        self.message = widgets.HTML("")
        self.message.add_class("mlmd-jobs-message")
        self.dashboard = widgets.HTML("")
        self.dashboard.add_class("mlmd-jobs-dashboard")
        self.summary = widgets.HTML("")
        self.summary.add_class("mlmd-jobs-summary")
        self.jobs = widgets.HTML("")
        self.jobs.add_class("mlmd-jobs-jobs")
        self.workers = widgets.HTML("")
        self.workers.add_class("mlmd-jobs-workers")
        self.tasks = widgets.HTML("")
        self.tasks.add_class("mlmd-jobs-tasks")
        self.failed = widgets.HTML("")
        self.failed.add_class("mlmd-jobs-failed")

        def button(description: str, css: str, tooltip: str, handler) -> widgets.Button:
            b = widgets.Button(description=description, tooltip=tooltip, layout=widgets.Layout(width="auto"))
            b.add_class(css)
            b.on_click(lambda _: self._safely(handler))
            return b

        self.scale_up = button("+1", "mlmd-jobs-scale-up", f"one {unit} more", lambda: self.scale(self.target + 1))
        self.scale_down = button("−1", "mlmd-jobs-scale-down", f"one {unit} fewer",
                                 lambda: self.scale(max(0, self.target - 1)))
        self.scale_n = widgets.BoundedIntText(value=self.target if self.cluster is not None else 0, min=0,
                                              max=100000, layout=widgets.Layout(width="70px"))
        self.scale_n.add_class("mlmd-jobs-scale-n")
        self.scale_to = button(f"scale to N {unit}s", "mlmd-jobs-scale-to", f"request exactly N {unit}s",
                               lambda: self.scale(int(self.scale_n.value)))
        self.adapt_min = widgets.BoundedIntText(value=0, min=0, max=100000, layout=widgets.Layout(width="70px"))
        self.adapt_min.add_class("mlmd-jobs-adapt-min")
        self.adapt_max = widgets.BoundedIntText(value=max(1, self.target if self.cluster is not None else 1), min=0,
                                                max=100000, layout=widgets.Layout(width="70px"))
        self.adapt_max.add_class("mlmd-jobs-adapt-max")
        self.adapt_button = button("adapt", "mlmd-jobs-adapt", f"let dask scale between min and max {unit}s by load",
                                   lambda: self.adapt(int(self.adapt_min.value), int(self.adapt_max.value)))
        self.refresh_button = button("refresh", "mlmd-jobs-refresh", "read the state now", self.refresh)
        controls = [self.scale_down, self.scale_up, self.scale_n, self.scale_to, widgets.HTML("&nbsp;min"),
                    self.adapt_min, widgets.HTML("max"), self.adapt_max, self.adapt_button]
        if self.cluster is None:
            for control in controls:
                if isinstance(control, widgets.Button | widgets.BoundedIntText):
                    control.disabled = True
        bar = widgets.HBox([*controls, self.refresh_button, self.dashboard],
                           layout=widgets.Layout(align_items="center", flex_flow="row wrap"))
        kind = type(self.cluster).__name__ if self.cluster is not None else "remote scheduler"
        title = widgets.HTML(f"<b>Dask cluster</b>: {html.escape(kind)}")
        super().__init__(children=[widgets.HBox([title, self.status]), bar, self.message, self.summary, self.jobs,
                                   self.workers, self.tasks, self.failed])
        self.add_class("mlmd-jobs")

    # ------------------------------------------------------------------ refreshing
    def start(self, interval: float | None = None) -> None:
        """Refresh every ``interval`` seconds (default: the constructor's) in a background thread."""
        if interval is not None:
            if not interval > 0:
                raise MLMDError(f"interval={interval} must be > 0 (seconds)")
            self.interval = float(interval)
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="mlmd-job-monitor")
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing (the widget keeps showing the last state)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 10)

    @property
    def refreshing(self) -> bool:
        """True while the refresh thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.client.status in ("closing", "closed"):
                self._set_status("client closed; refreshing stopped")
                return
            self.refresh()

    def refresh(self) -> dict[str, Any]:
        """Read the cluster's state now and show it; returns :attr:`snapshot`."""
        with self._lock:
            try:
                snap = self.client.run_on_scheduler(self._snapshot)
            except Exception as err:  # noqa: BLE001 (shown in the widget; the next refresh retries)
                self._set_status(f"cannot read the scheduler: {type(err).__name__}: {err}", error=True)
                return self.snapshot
            names = {w["name"] for w in snap["workers"]}
            snap["jobs"] = jobs_of(self.cluster, names) if self.cluster is not None else []
            snap["dashboard"] = dashboard_url(self.client)
            snap["adaptive"] = self.adaptive
            self.snapshot = snap
            self.refreshes += 1
            self._render(snap)
            self._set_status(f"updated {time.strftime('%H:%M:%S')}"
                             + (f", every {self.interval:g} s" if self.refreshing else ""))
            return snap

    # ------------------------------------------------------------------ scaling
    @property
    def target(self) -> int:
        """Jobs (jobqueue) or workers (LocalCluster) currently requested."""
        if self.cluster is None:
            return 0
        return len(getattr(self.cluster, "worker_spec", {}) or {})

    @property
    def adaptive(self) -> bool:
        """True while ``cluster.adapt`` is on."""
        adaptive = getattr(self.cluster, "_adaptive", None)
        return adaptive is not None and getattr(adaptive, "state", None) in ("starting", "running")

    def scale(self, n: int) -> None:
        """Request ``n`` jobs (jobqueue clusters) or ``n`` workers (others); switches adapt off."""
        cluster = self._scalable()
        n = int(n)
        if n < 0:
            raise MLMDError(f"cannot scale to {n}; give 0 or more")
        self._stop_adapt()
        if _is_jobqueue(cluster):
            cluster.scale(jobs=n)
        else:
            cluster.scale(n)
        self.scale_n.value = n
        self._set_message(f"requested {n} {self._unit}{'s' if n != 1 else ''}")
        self.refresh()

    def adapt(self, minimum: int, maximum: int) -> None:
        """Let dask scale between ``minimum`` and ``maximum`` jobs (jobqueue) or workers by load."""
        cluster = self._scalable()
        if not 0 <= minimum <= maximum:
            raise MLMDError(f"adapt needs 0 <= minimum <= maximum, got {minimum} and {maximum}")
        if _is_jobqueue(cluster):
            cluster.adapt(minimum_jobs=minimum, maximum_jobs=maximum)
        else:
            cluster.adapt(minimum=minimum, maximum=maximum)
        self._set_message(f"adapting between {minimum} and {maximum} {self._unit}s")
        self.refresh()

    def _scalable(self) -> Any:
        if self.cluster is None or not hasattr(self.cluster, "scale"):
            raise MLMDError("this client has no cluster object to scale (a remote scheduler); scale it where "
                            "the cluster was created")
        return self.cluster

    def _stop_adapt(self) -> None:
        adaptive = getattr(self.cluster, "_adaptive", None)
        if adaptive is not None:
            adaptive.stop(reason="scaled by hand in the JobMonitor")

    def _safely(self, action) -> None:
        """Run a button's action; errors go to the status line instead of the browser's void."""
        try:
            action()
        except Exception as err:  # noqa: BLE001
            self._set_message(f"{type(err).__name__}: {err}", error=True)

    # ------------------------------------------------------------------ rendering
    def _set_status(self, text: str, error: bool = False) -> None:
        color = "#c62828" if error else "#666"
        self.status.value = f"<span style='color:{color}'>&nbsp;{html.escape(text)}</span>"

    def _set_message(self, text: str, error: bool = False) -> None:
        """The outcome of the last button (kept until the next one; refreshes write :attr:`status`)."""
        color = "#c62828" if error else "inherit"
        self.message.value = f"<span style='color:{color}'>{html.escape(text)}</span>"

    @property
    def _unit(self) -> str:
        return "job" if _is_jobqueue(self.cluster) else "worker"

    def _render(self, snap: dict[str, Any]) -> None:
        from dask.utils import format_bytes

        workers, jobs = snap["workers"], snap["jobs"]
        threads = sum(w["threads"] for w in workers)
        memory = sum(w["memory_limit"] or 0 for w in workers)
        parts = [f"<b>{len(workers)}</b> workers", f"{threads} threads", f"{format_bytes(memory)} memory"]
        if self.cluster is not None:
            unit = "jobs" if _is_jobqueue(self.cluster) else "workers"
            counts = {s: sum(j["state"] == s for j in jobs) for s in ("running", "pending", "requested")}
            parts.insert(0, f"{unit}: {len(jobs)} requested, {counts['running']} running, "
                            f"{counts['pending'] + counts['requested']} pending")
        if snap["adaptive"]:
            parts.append("adaptive")
        self.summary.value = f"<span class='mlmd-jobs-counts' data-workers='{len(workers)}'>{' · '.join(parts)}</span>"
        self.jobs.value = _jobs_table(jobs) if _is_jobqueue(self.cluster) else ""
        self.workers.value = _workers_table(workers, format_bytes)
        self.tasks.value = _tasks_line(snap["tasks"])
        self.failed.value = _failed_list(snap["failed"])
        link = snap["dashboard"]
        self.dashboard.value = ("" if not link else
                                f"<a href='{html.escape(link)}' target='_blank' class='mlmd-jobs-dashboard-link'>"
                                "dashboard ↗</a>")

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Stop refreshing, close the client this monitor made (never the cluster), close the widget."""
        if hasattr(self, "_stop"):  # not on a half-built monitor (bad arguments; ipywidgets closes it on delete)
            self.stop()
            if self._owns_client:
                self.client.close()
        super().close()


def _jobs_table(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "<i>no jobs requested</i>"
    rows = "".join(f"<tr class='mlmd-jobs-job' data-state='{j['state']}'><td>{html.escape(j['name'])}</td>"
                   f"<td>{html.escape(str(j['job_id'] or '–'))}</td><td>{j['state']}</td></tr>" for j in jobs)
    return f"<table><tr><th>job</th><th>job id</th><th>state</th></tr>{rows}</table>"


def _workers_table(workers: list[dict[str, Any]], format_bytes) -> str:
    if not workers:
        return "<i>no workers connected</i>"

    def memory(w: dict[str, Any]) -> str:
        used = "?" if w["memory"] is None else format_bytes(w["memory"])
        return f"{used} / {format_bytes(w['memory_limit'])}" if w["memory_limit"] else used

    rows = "".join(f"<tr class='mlmd-jobs-worker'><td>{html.escape(w['name'])}</td><td>{html.escape(w['host'])}</td>"
                   f"<td>{w['threads']}</td><td>{memory(w)}</td><td>{w['processing']}</td><td>{w['in_memory']}</td>"
                   "</tr>" for w in sorted(workers, key=lambda w: w["name"]))
    head = ("<tr><th>worker</th><th>host</th><th>threads</th><th>memory used / limit</th><th>processing</th>"
            "<th>results held</th></tr>")
    return f"<table>{head}{rows}</table>"


def _tasks_line(counts: dict[str, int]) -> str:
    states = [s for s in TASK_STATES if counts.get(s)] + sorted(s for s in counts if s not in TASK_STATES)
    if not states:
        return "tasks: <i>none held by the scheduler</i>"
    items = " · ".join(f"<span class='mlmd-jobs-task-state' data-state='{html.escape(s)}'>{html.escape(s)} "
                       f"<b>{counts[s]}</b></span>" for s in states)
    return f"tasks: {items}"


def _failed_list(failed: list[dict[str, str]]) -> str:
    if not failed:
        return ""
    items = "".join(f"<li class='mlmd-jobs-failed-task'><code>{html.escape(f['key'])}</code>: "
                    f"<span style='color:#c62828'>{html.escape(f['exception'])}</span>"
                    f"<details><summary>traceback</summary><pre>{html.escape(f['traceback'])}</pre></details></li>"
                    for f in failed)
    return f"<b>failed tasks</b><ul>{items}</ul>"
