"""Jupyter server configuration for Binder and JupyterHub (copy to ~/.jupyter/ or <prefix>/etc/jupyter/).

The dask dashboard (default port 8787) gets a launcher tile through jupyter-server-proxy; any other dashboard port
is reachable as <hub prefix>/proxy/<port>/status without configuration.
"""

c = get_config()  # noqa: F821 - provided by Jupyter when it loads this file

c.ServerProxy.servers = {
    "dask": {
        "command": [],  # the dashboard is started by dask (LocalCluster or a jobqueue cluster), not by the proxy
        "port": 8787,
        "absolute_url": False,
        "launcher_entry": {"title": "Dask dashboard", "enabled": True},
    },
}
