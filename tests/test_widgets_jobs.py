"""JobMonitor: a real distributed.LocalCluster (and a real Slurm cluster when this machine runs one), scale
buttons, task states and failures, the dashboard link through jupyter-server-proxy; in Python and a browser.
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid

import pytest
from conftest import wait_until

from mlmd_lab.errors import MLMDError
from mlmd_lab.widgets import JobMonitor
from mlmd_lab.widgets.jobs import dashboard_url, jobs_of, proxied_dashboard_link


def fail(x):
    raise ValueError(f"bad input {x}")


@pytest.fixture
def local():
    from distributed import Client, LocalCluster

    logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)  # the failing task logs its traceback
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")
    client = Client(cluster, set_as_default=False)
    yield cluster, client
    client.close()
    cluster.close()


def test_monitor_shows_workers_tasks_and_failures(local):
    cluster, client = local
    monitor = JobMonitor(cluster, start=False)
    assert "mlmd-jobs" in monitor._dom_classes and not monitor.refreshing
    snap = monitor.snapshot
    assert [w["threads"] for w in snap["workers"]] == [1] and monitor.workers.value.count("mlmd-jobs-worker") == 1
    assert snap["jobs"] == [{"name": "0", "job_id": None, "state": "running"}]
    assert "workers: 1 requested, 1 running, 0 pending" in monitor.summary.value
    done = client.submit(sum, [1, 2, 3])
    bad = client.submit(fail, 7)
    assert done.result() == 6
    # .exception(), not .result(): raising in-process (processes=False) ties the future to the scheduler's
    # exception object through the traceback, so the task would never be forgotten
    assert isinstance(bad.exception(), ValueError)
    snap = monitor.refresh()
    assert snap["tasks"] == {"memory": 1, "erred": 1}
    assert "data-state='memory'>memory <b>1</b>" in monitor.tasks.value
    assert "data-state='erred'>erred <b>1</b>" in monitor.tasks.value
    assert [f["exception"] for f in snap["failed"]] == ["ValueError('bad input 7')"]
    assert "bad input 7" in monitor.failed.value and "fail-" in monitor.failed.value
    assert "in fail" in snap["failed"][0]["traceback"]
    # a dependent of the failed task errs too, but only the task that raised is listed
    dependent = client.submit(lambda x: x, bad)
    assert isinstance(dependent.exception(), ValueError)
    snap = monitor.refresh()
    assert snap["tasks"]["erred"] == 2 and len(snap["failed"]) == 1
    del done, bad, dependent  # released futures: the scheduler forgets the tasks
    wait_until(lambda: not monitor.refresh()["tasks"], what="tasks forgotten")
    assert "none held by the scheduler" in monitor.tasks.value
    link = monitor.dashboard.value
    assert client.dashboard_link in link and "mlmd-jobs-dashboard-link" in link
    monitor.close()
    assert monitor.client.status == "closed" and client.status == "running"  # its own client only


def test_scale_buttons_and_adapt_change_the_workers(local):
    cluster, client = local
    monitor = JobMonitor(client, interval=0.2)
    assert monitor.cluster is cluster and monitor.refreshing
    monitor.scale_up.click()
    assert monitor.target == 2
    wait_until(lambda: len(monitor.snapshot.get("workers", [])) == 2, what="the refresh thread to see 2 workers")
    assert "<b>2</b> workers" in monitor.summary.value and monitor.workers.value.count("mlmd-jobs-worker") == 2
    monitor.scale_n.value = 3
    monitor.scale_to.click()
    assert "requested 3 workers" in monitor.message.value
    wait_until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 3, what="3 workers")
    monitor.scale_down.click()
    wait_until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 2, what="2 workers")
    monitor.adapt_min.value, monitor.adapt_max.value = 1, 2
    monitor.adapt_button.click()
    assert monitor.adaptive and "adaptive" in monitor.summary.value
    before = monitor.target
    monitor.scale_up.click()  # scaling by hand switches adapt off
    assert not monitor.adaptive and monitor.target == before + 1
    monitor.adapt_min.value, monitor.adapt_max.value = 3, 1
    monitor.adapt_button.click()  # bad input: a message in the widget, not an exception lost in the browser
    assert "adapt needs 0 &lt;= minimum &lt;= maximum, got 3 and 1" in monitor.message.value
    count = monitor.refreshes
    wait_until(lambda: monitor.refreshes > count + 1, what="periodic refreshes")
    monitor.stop()
    assert not monitor.refreshing
    count = monitor.refreshes
    time.sleep(0.5)
    assert monitor.refreshes == count
    monitor.close()
    assert client.status == "running"  # a client handed in is the caller's


def test_dashboard_link_through_jupyter_server_proxy(local):
    cluster, client = local
    port = client.scheduler_info()["services"]["dashboard"]
    assert dashboard_url(client, environ={}) == client.dashboard_link
    hub = {"JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"}
    assert dashboard_url(client, environ=hub) == f"/user/alice/proxy/{port}/status"
    assert proxied_dashboard_link("http://127.0.0.1:8787/status", "/user/a") == "/user/a/proxy/8787/status"
    assert proxied_dashboard_link("http://node12.example.org:8787/status", "/user/a/") == \
        "/user/a/proxy/node12.example.org:8787/status"
    with pytest.raises(MLMDError, match="has no port"):
        proxied_dashboard_link("http://host/status", "/user/a/")


def test_bad_argument_is_named():
    with pytest.raises(MLMDError, match="needs a dask cluster or distributed.Client, not str"):
        JobMonitor("local")


def test_jobs_of_spec_cluster_groups():
    class Job:
        job_id = "17"

    class Fake:  # the SpecCluster attributes jobs_of reads: two jobs of two processes each, one submitted
        worker_spec = {"job-0": {"group": ["-0", "-1"]}, "job-1": {"group": ["-0", "-1"]}, "job-2": {}}
        workers = {"job-0": Job(), "job-1": Job()}

    jobs = jobs_of(Fake(), {"job-0-1"})
    assert [j["state"] for j in jobs] == ["running", "pending", "requested"]
    assert jobs[0]["job_id"] == "17" and jobs[2]["job_id"] is None


# ------------------------------------------------------------------------------------------------ Slurm
@pytest.mark.slow
def test_monitor_of_a_real_slurm_cluster(slurm, tmp_path, monkeypatch):
    from distributed import Client

    import mlmd_lab

    monkeypatch.chdir(tmp_path)
    name = f"mlmd-jobmon-{uuid.uuid4().hex[:8]}"
    cluster = mlmd_lab.cluster("slurm", cores=1, memory="1GB", queue="debug", interface="lo", walltime="00:10:00",
                               job_name=name, log_directory=str(tmp_path / "logs"),
                               scheduler_options={"dashboard_address": ":0"})
    try:
        monitor = JobMonitor(cluster, interval=0.3)
        assert monitor.snapshot["jobs"] == [] and "no jobs requested" in monitor.jobs.value
        monitor.scale_up.click()
        wait_until(lambda: [j["state"] for j in monitor.snapshot["jobs"]] == ["running"], 120, "a running job")
        job_id = monitor.snapshot["jobs"][0]["job_id"]
        squeue = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
        assert job_id and squeue.split() == [job_id]
        assert f"<td>{job_id}</td><td>running</td>" in monitor.jobs.value
        with Client(cluster, set_as_default=False) as client:
            assert client.submit(pow, 2, 10).result() == 1024
            bad = client.submit(int, "slurm")  # a builtin: the worker process need not import this test module
            wait_until(lambda: bad.status == "error", 60, "the failing task")
            snap = monitor.refresh()
            assert snap["tasks"].get("erred") == 1
            assert "invalid literal for int() with base 10: &#x27;slurm&#x27;" in monitor.failed.value
        monitor.scale_down.click()
        wait_until(lambda: not monitor.snapshot["workers"], 120, "the job to end")
        monitor.close()
    finally:
        cluster.close()
        subprocess.run(["scancel", "-n", name], capture_output=True)


# ------------------------------------------------------------------------------------------ browser
@pytest.mark.slow
def test_job_monitor_in_jupyterlab(run_notebook):
    nb = run_notebook([
        "import logging\nfrom distributed import LocalCluster, Client\nfrom mlmd_lab.widgets import JobMonitor\n"
        "logging.getLogger('distributed.worker').setLevel(logging.CRITICAL)\n"
        "cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=':0')\n"
        "client = Client(cluster)\n"
        "def fail(x):\n    raise ValueError(f'bad input {x}')\n"
        "done, bad = client.submit(sum, [1, 2]), client.submit(fail, 7)\n"
        "done.result(), bad.exception()",
        "monitor = JobMonitor(cluster, interval=0.5)\nmonitor",
    ])
    page = nb.page
    page.locator(".mlmd-jobs").wait_for(timeout=60_000)
    counts = page.locator(".mlmd-jobs-counts")
    page.locator(".mlmd-jobs-counts[data-workers='1']").wait_for(timeout=30_000)
    assert page.locator("tr.mlmd-jobs-worker").count() == 1
    page.locator(".mlmd-jobs-task-state[data-state='memory']", has_text="1").wait_for(timeout=30_000)
    page.locator(".mlmd-jobs-task-state[data-state='erred']", has_text="1").wait_for(timeout=30_000)
    page.locator(".mlmd-jobs-failed-task", has_text="bad input 7").wait_for(timeout=30_000)
    href = page.locator("a.mlmd-jobs-dashboard-link").get_attribute("href")
    assert href.startswith("http") and href.endswith("/status")
    nb.screenshot("one-worker", page.locator(".mlmd-jobs"))
    page.locator(".mlmd-jobs-scale-up").click()
    page.locator(".mlmd-jobs-message", has_text="requested 2 workers").wait_for(timeout=60_000)  # Python answered
    page.locator(".mlmd-jobs-counts[data-workers='2']").wait_for(timeout=60_000)
    assert "2 requested" in counts.inner_text() and page.locator("tr.mlmd-jobs-worker").count() == 2
    page.locator(".mlmd-jobs-scale-down").click()
    page.locator(".mlmd-jobs-counts[data-workers='1']").wait_for(timeout=60_000)
    nb.screenshot("scaled", page.locator(".mlmd-jobs"))
    nb.assert_no_console_errors()
