"""The report in a real browser: a tiny transformers Llama's decode step compiled with attnopt,
its report rendered by headless Chromium (skipped where there is none: Debian's `chromium`
package provides it). scripts/report_screenshot.py does the same by hand, for looking at."""

from __future__ import annotations

import shutil
import struct

import pytest

pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                       reason="no chromium binary (Debian: apt-get install chromium)"),
]


def test_real_report_renders_in_headless_chromium(tmp_path):
    from scripts.report_screenshot import decode_report, screenshot

    page = decode_report(tmp_path)
    html = page.read_text()
    assert html.count("<svg class=\"g\"") == 6  # per layer: a rewrite (2 pictures), a rejection
    assert html.count('class="n cand fail"') == 2
    png = tmp_path / "report.png"
    screenshot(page, png, width=1200, height=1600)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1200, 1600)  # IHDR: the window it rendered
