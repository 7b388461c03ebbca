"""The report page: one self-contained HTML file (plots embedded as base64 PNGs, no external URL) with a
script that marks how many plots the browser decoded (`data-plots-loaded`, checked by the tests)."""
from __future__ import annotations

import html
from pathlib import Path

from ..tables import atomic_write_bytes

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1300px; color: #222; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: right; }}
th {{ background: #f4f4f4; }} td.l, th.l {{ text-align: left; }}
img.plot {{ max-width: 100%; display: block; margin: 8px 0; }} .note {{ color: #666; font-size: 13px; }}
</style></head><body>
<h1>{title}</h1>
{body}
<script>
window.addEventListener('load', function () {{
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  imgs.forEach(function (im) {{
    im.setAttribute('data-natural-width', im.naturalWidth);
    im.setAttribute('data-natural-height', im.naturalHeight);
    if (im.naturalWidth > 0 && im.naturalHeight > 0) ok++;
  }});
  document.body.setAttribute('data-plots-loaded', ok + '/' + imgs.length);
}});
</script>
</body></html>
"""


def img(b64: str, alt: str, pid: str) -> str:
    """An embedded PNG plot (the page's script checks every one decoded)."""
    return f'<img class="plot" id="{pid}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def table(header, rows, left=1) -> str:
    """An HTML table, every cell escaped; the first `left` columns left-aligned."""
    h = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(str(x))}</th>' for i, x in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{html.escape(str(x))}</td>' for i, x in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def write_page(path: Path, title: str, body: list[str]) -> None:
    """The page, atomically: `title` and the `body` parts (HTML) in order."""
    atomic_write_bytes(path, PAGE.format(title=html.escape(title), body="\n".join(body)).encode())
