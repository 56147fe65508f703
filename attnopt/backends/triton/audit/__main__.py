"""`python -m attnopt.backends.triton.audit`: run the compile audit, print its tables, write
its JSON; exit 1 if any job fails (see `report`), 2 on bad usage."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

# Triton 3.9 warns once that its FP-fusion default will change; the audit compiles with the
# default the JIT uses, so the warning says nothing about the audit.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

from attnopt.backends.triton.audit import ARCHS, compile, report, run, scenarios  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnopt.backends.triton.audit",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", default=bool(os.environ.get(
        "ATTNOPT_AUDIT_FULL")), help="every dtype, flag and shape (default: the standard tier; "
                                     "also set by ATTNOPT_AUDIT_FULL=1)")
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--family", nargs="+", choices=list(scenarios.FAMILIES))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel compiles (default: all cores)")
    parser.add_argument("--cache", type=Path, default=compile.default_cache_dir(),
                        help="results cache (default $ATTNOPT_AUDIT_CACHE or "
                             "~/.cache/attnopt/audit)")
    parser.add_argument("--json", type=Path, help="write the audit here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("attnopt audit: the compile audit needs the Triton JIT, but TRITON_INTERPRET=1 "
              "selects the interpreter; run it without TRITON_INTERPRET.", file=sys.stderr)
        return 2

    start = time.perf_counter()

    def progress(i, total, job, result):
        if not args.quiet and (i % 25 == 0 or i == total):
            print(f"  compiled {i}/{total} ({time.perf_counter() - start:.0f} s)", flush=True)

    audit = run(args.full, tuple(args.arch), args.family, args.workers, args.cache, progress)
    jobs = audit.jobs()
    print(f"\nattnopt GPU compile audit, {audit.tier} tier: {len(audit.launches)} launches, "
          f"{len(jobs)} compile jobs, {time.perf_counter() - start:.0f} s\n")
    print(report.markdown([s.row() for s in audit.summaries()]))
    failures = audit.failures()
    failing = {(f["kernel"], f["arch"], f["config"]) for f in failures}
    print(f"failing: {len(failing)} configs of {len({(f['kernel'], f['arch']) for f in failures})}"
          f" kernel x arch ({sum(s.failing for s in audit.summaries())} jobs)")
    print(report.markdown(report.failure_digest(failures)))
    print("second length in a bucket:")
    print(report.markdown(audit.retune))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(audit.to_json())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
