"""Render a real attnopt report and take a screenshot of it in headless Chromium.

    python3 -m scripts.report_screenshot [OUT_DIR]     # from the repository root; default
                                                       # OUT_DIR: ./report-screenshot

Compiles a small random-weight transformers Llama (2 layers) with backend="attnopt" and
options={"inner": "eager"}, runs a prefill and one decode step with a DynamicCache, writes the
decode graph's report (attention rewrites, plus the kv_cache pass's rejected candidates: a
DynamicCache is left alone in a compiled graph) to OUT_DIR/graph<N>.html, and screenshots it to
OUT_DIR/report.png. Needs transformers and a `chromium` binary (Debian: apt-get install
chromium); nothing is fetched from the network.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

import attnopt
from attnopt.compat import with_cache


def decode_report(out_dir: Path) -> Path:
    """The HTML report of a tiny Llama's decode step: one rewrite and one rejection per layer."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    compiled = torch.compile(model, backend="attnopt", options={"inner": "eager"})
    ids = torch.randint(0, 128, (1, 8))
    attnopt.clear_reports()
    with torch.no_grad():
        prefill = compiled(input_ids=ids, use_cache=True)
        cache = getattr(prefill, "cache", None) or prefill.past_key_values
        compiled(input_ids=ids[:, -1:], **with_cache(model, cache))
    report = next(r for r in reversed(attnopt.reports()) if r.rejected)
    return report.write(out_dir)


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 2400) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium binary on PATH (Debian: apt-get install chromium)")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", f"--window-size={width},{height}",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    if not png.is_file():
        raise SystemExit(f"chromium wrote no screenshot to {png}")


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "report-screenshot")
    page = decode_report(out_dir)
    screenshot(page, out_dir / "report.png")
    print(f"wrote {page} and {out_dir / 'report.png'}")


if __name__ == "__main__":
    main()
