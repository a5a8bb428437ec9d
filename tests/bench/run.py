"""Run every benchmark under tests/bench, then write BENCHMARKS.md: what ``make bench`` does.

    SIMSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:39092 .venv/bin/python tests/bench/run.py [options]

    --quick                     each bench's QUICK_ARGS (a smoke test of the tooling); results, report
                                and plots go under var/bench-quick, never to BENCHMARKS.md
    --only stream,soak          run only these (names: bench_<name>.py, and soak); the report is
                                regenerated from every result in the results folder
    --skip encoder              run all but these
    --args 'soak=--duration 600'  extra arguments for one bench (repeatable)
    --list                      print the benches and exit

Benches: every ``tests/bench/bench_*.py`` in name order, then ``soak.py`` (last: by default it
soaks at half the highest rate the stream bench held). Each runs as its own process with
``SIMSTREAM_BENCH_OUT`` set to the results folder; its standard output goes to the terminal
and to ``<name>.log``, and its final line, one JSON object, becomes the summary in
``<name>.run.json``. A failing bench does not stop the others; the exit status is 1 if any
failed. See ``harness.py`` for the conventions a new bench follows.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.report import ROOT, build, git_state, machine_info

BENCH_DIR = ROOT / "tests" / "bench"


def discover() -> dict[str, Path]:
    """name -> script: bench_*.py by name, then soak.py."""
    found = {p.stem.removeprefix("bench_"): p for p in sorted(BENCH_DIR.glob("bench_*.py"))}
    if (BENCH_DIR / "soak.py").exists():
        found["soak"] = BENCH_DIR / "soak.py"
    return found


def quick_args(script: Path) -> list[str]:
    """The script's module-level ``QUICK_ARGS`` (read, not imported), or none."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "QUICK_ARGS" for t in node.targets):
            return [str(v) for v in ast.literal_eval(node.value)]
    return []


def final_json(lines: list[str]) -> dict[str, Any] | None:
    """The last line that is a JSON object (the bench's summary)."""
    for line in reversed(lines):
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
        return None
    return None


def run_one(name: str, script: Path, args: list[str], out: Path, quick: bool) -> dict[str, Any]:
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    argv = [sys.executable, str(script), *args]
    shown = shlex.join([python, str(script.relative_to(ROOT)), *args])
    print(f"\n== {name}: {shown}", flush=True)
    env = {**os.environ, "SIMSTREAM_BENCH_OUT": str(out), "PYTHONUNBUFFERED": "1",
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load0 = list(os.getloadavg())
    t0 = time.monotonic()
    lines: list[str] = []
    stderr_path = out / f"{name}.stderr.log"
    with (out / f"{name}.log").open("w") as log, stderr_path.open("w") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
    wall = time.monotonic() - t0
    if rc != 0:
        tail = stderr_path.read_text(errors="replace").splitlines()[-40:]
        print(f"== {name} FAILED (exit {rc}); last lines of {stderr_path}:", *tail, sep="\n", flush=True)
    record = {"name": name, "script": str(script.relative_to(ROOT)), "command": shown, "args": args, "rc": rc,
              "started": started, "wall_s": round(wall, 1), "loadavg_start": load0,
              "loadavg_end": list(os.getloadavg()), "quick": quick, "git": git_state(),
              "summary": final_json(lines)}
    (out / f"{name}.run.json").write_text(json.dumps(record, indent=1))
    print(f"== {name}: exit {rc} after {wall:.0f} s", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated bench names")
    parser.add_argument("--skip", default="", help="comma-separated bench names")
    parser.add_argument("--args", action="append", default=[], metavar="NAME=ARGS")
    parser.add_argument("--out", type=Path, default=None, help="results folder [var/bench, var/bench-quick]")
    parser.add_argument("--report", type=Path, default=None, help="[BENCHMARKS.md, OUT/BENCHMARKS.md with --quick]")
    parser.add_argument("--plots", type=Path, default=None, help="[docs/bench, OUT/plots with --quick]")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()

    benches = discover()
    if args.list:
        for name, script in benches.items():
            print(f"{name:10} {script.relative_to(ROOT)}  quick: {shlex.join(quick_args(script))}")
        return
    only = {n for n in args.only.split(",") if n}
    skip = {n for n in args.skip.split(",") if n}
    extra: dict[str, list[str]] = {}
    for item in args.args:
        bench, _, value = item.partition("=")
        extra.setdefault(bench, []).extend(shlex.split(value))
    unknown = (only | skip | set(extra)) - set(benches)
    if unknown:
        sys.exit(f"unknown bench(es) {sorted(unknown)}; there are {sorted(benches)}")

    out = (args.out or ROOT / "var" / ("bench-quick" if args.quick else "bench")).resolve()
    report = args.report or (out / "BENCHMARKS.md" if args.quick else ROOT / "BENCHMARKS.md")
    plots = args.plots or (out / "plots" if args.quick else ROOT / "docs" / "bench")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "scratch", ignore_errors=True)  # worker data of earlier runs
    (out / "machine.json").write_text(json.dumps(machine_info(), indent=1))

    failed = []
    for name, script in benches.items():
        if (only and name not in only) or name in skip:
            continue
        bench_args = (quick_args(script) if args.quick else []) + extra.get(name, [])
        if run_one(name, script, bench_args, out, args.quick)["rc"] != 0:
            failed.append(name)
    if not args.no_report:
        build(out, report, plots)
        print(f"\nwrote {os.path.relpath(report, ROOT)} (plots in {os.path.relpath(plots, ROOT)}) from {out}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
