"""The HTML report: self-contained (figures embedded), escaped, written atomically."""

from __future__ import annotations

import base64
import os
import re

import pytest
from matplotlib.figure import Figure

from mlmd_lab.report import Report


def _figure() -> Figure:
    fig = Figure(figsize=(3, 2))
    ax = fig.subplots()
    ax.plot([0, 1, 2], [0, 1, 4])
    return fig


def test_report_embeds_figures_and_escapes_text(tmp_path):
    rep = (Report("energies <eV>").heading("Errors").text("a < b & c")
           .table([{"split": "test", "force RMSE (meV/Å)": 10.123456}]).check(True, "drift small")
           .check(False, "frequency off").figure(_figure(), "a curve"))
    path = rep.write(tmp_path / "out" / "report.html")
    html = path.read_text()
    assert "energies &lt;eV&gt;" in html and "a &lt; b &amp; c" in html
    assert "<td>10.12</td>" in html and "meV/Å" in html
    assert html.count("PASS") == 1 and html.count("FAIL") == 1
    data = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"  # a real PNG, no external file
    assert not list(path.parent.glob(".*tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file written with open()


def test_report_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("old report")

    class Broken(Report):
        def html(self) -> str:
            raise RuntimeError("figure failed")

    with pytest.raises(RuntimeError):
        Broken("x").write(path)
    assert path.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
