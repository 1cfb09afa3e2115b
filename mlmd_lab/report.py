"""A self-contained HTML report: headings, paragraphs, tables and matplotlib figures (embedded as PNG).

One file, no external assets, so it can be mailed, attached to a ticket or opened from a cluster's scratch folder.
The file is written atomically (a half-written report never replaces a good one).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlmd_lab.files import atomic_write_text

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #345; } h2 { margin-top: 2em; color: #345; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #eef2f6; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
.ok { color: #1a7f37; font-weight: bold; } .bad { color: #b42318; font-weight: bold; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    return html.escape("" if value is None else str(value))


class Report:
    """An HTML document built section by section.

    ``Report("title").heading("…").text("…").table(rows).figure(fig, caption).write(path)``.
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> Report:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, text: str, css_class: str | None = None) -> Report:
        cls = f' class="{css_class}"' if css_class else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def check(self, passed: bool, text: str) -> Report:
        """A pass/fail line (a physics or accuracy check)."""
        mark = '<span class="ok">PASS</span>' if passed else '<span class="bad">FAIL</span>'
        self.parts.append(f"<p>{mark} {html.escape(text)}</p>")
        return self

    def preformatted(self, text: str) -> Report:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Report:
        """A table of dict rows; ``columns`` (default: the first row's keys) are the headers, units in the names."""
        if not rows:
            return self.text("(none)")
        columns = list(columns or rows[0].keys())
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def figure(self, fig, caption: str = "", dpi: int = 110) -> Report:
        """Embed a matplotlib Figure as a PNG (the figure is closed afterwards)."""
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        img = f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        self.parts.append(f"<figure>{img}{cap}</figure>")
        return self

    def html(self) -> str:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}"
                f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
                f"<p>Written {stamp} by mlmd_lab.</p>{''.join(self.parts)}</body></html>\n")

    def write(self, path: str | os.PathLike) -> Path:
        """Write the report atomically; returns the path."""
        return atomic_write_text(path, self.html())
