"""Shared by the benchmark scripts: timing with torch.utils.benchmark, and writing one table as
markdown and JSON with the environment it was measured in."""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.benchmark as tbench


def median_ms(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Median milliseconds of fn(*args, **kwargs), after two untimed calls (compile, warm-up)."""
    fn(*args, **kwargs)
    fn(*args, **kwargs)
    timer = tbench.Timer(stmt="fn(*args, **kwargs)",
                         globals={"fn": fn, "args": args, "kwargs": kwargs})
    return timer.blocked_autorange(min_run_time=0.5).median * 1e3


def environment() -> dict[str, str]:
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        import triton

        env["device"] = torch.cuda.get_device_name()
        env["triton"] = triton.__version__
    else:
        env["device"] = "cpu"
    return env


def write_table(name: str, rows: list[dict], columns: list[str], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(r[c]) for c in columns) + " |\n" for r in rows)
    env_line = ", ".join(f"{k} {v}" for k, v in env.items())
    table = f"### {name}\n\n{env_line}\n\n{header}{body}"
    stem = f"{name}-{env['device'].replace(' ', '_')}"
    (out_dir / f"{stem}.md").write_text(table)
    (out_dir / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    return table


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v)
