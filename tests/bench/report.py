"""Assemble BENCHMARKS.md from the results ``run.py`` left in a results folder.

    .venv/bin/python tests/bench/report.py                       # var/bench -> BENCHMARKS.md + docs/bench/*.png
    .venv/bin/python tests/bench/report.py --results var/bench-quick --report var/bench-quick/BENCHMARKS.md \\
        --plots var/bench-quick/plots

Per bench, ``run.py`` leaves ``<name>.run.json`` (command, exit status, timing, load average,
the final JSON line as ``summary``) and ``<name>.log`` (its standard output); a bench may add
``<name>.samples.json`` (plots: see ``harness.py``). The report holds the machine
(``machine.json``), then per bench: the exact command, every markdown table it printed (or its
summary as a table when it printed none), its plots as PNG, and its full output folded away.
Nothing here knows a particular bench, so a new ``bench_*.py`` needs no change here.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
PACKAGES = ["faust-streaming", "aiokafka", "kafka-python", "tensorflow", "hnswlib", "numpy", "tokenizers",
            "scikit-learn", "pydantic", "matplotlib"]
MAX_OUTPUT_LINES = 150


# ---- the machine


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_state() -> dict[str, Any]:
    return {"commit": _git("rev-parse", "HEAD"), "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


def _cpuinfo() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    cores = {(block.get("physical id"), block.get("core id"))
             for block in ({k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in chunk.splitlines())}
                           for chunk in text.split("\n\n") if chunk.strip())}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    return {"model": model, "logical": os.cpu_count(), "physical": len(cores) if cores - {(None, None)} else None,
            "isa": isa}


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _java() -> str:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        return (out.stderr or out.stdout).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


def _kafka_version() -> str:
    script = (ROOT / "infra" / "kafka" / "kafka.sh").read_text()
    found = re.search(r'KAFKA_VERSION:-([0-9.]+)', script)
    return os.environ.get("KAFKA_VERSION") or (found.group(1) if found else "?")


def _gpu() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().replace("\n", "; ") or "none"
    except (OSError, subprocess.TimeoutExpired):
        return "none"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": _cpuinfo(), "memory_gib": _meminfo_gib(),
            "os": _os_name(), "kernel": platform.release(), "python": platform.python_version(),
            "packages": versions, "kafka": _kafka_version(), "java": _java(), "gpu": _gpu(),
            "loadavg": list(os.getloadavg()), "git": git_state()}


# ---- plots


def _fmt(value: float) -> str:
    if value != value:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def render_latency(plot: dict[str, Any], path: Path) -> None:
    """Histogram (log-spaced bins where the range is wide) and CDF, one line per series."""
    import matplotlib.pyplot as plt
    import numpy as np

    unit = plot.get("unit", "ms")
    series = {label: sorted(float(v) for v in values) for label, values in plot["series"].items() if values}
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4))
    values = [v for vs in series.values() for v in vs]
    positive = [v for v in values if v > 0]
    lo = min(positive, default=1e-3)
    hi = max(values, default=1.0)
    log = hi / lo > 50
    floor = lo / 2 if log else 0.0
    nbins = int(min(60, max(15, 2 * min(len(vs) for vs in series.values()) ** 0.5))) if series else 15
    bins = (np.geomspace(max(floor, 1e-6), max(hi, lo * 1.01), nbins) if log
            else np.linspace(0, max(hi, 1e-6), nbins))
    for label, vs in series.items():
        arr = np.maximum(np.asarray(vs), floor) if log else np.asarray(vs)
        legend = (f"{label}: p50 {_fmt(_percentile(vs, 50))}, p99 {_fmt(_percentile(vs, 99))} {unit} "
                  f"(n={len(vs):,})")
        hist.hist(arr, bins=bins, histtype="step", linewidth=1.4, weights=np.full(len(arr), 1 / len(arr)),
                  label=legend)
        cdf.plot(arr, np.arange(1, len(arr) + 1) / len(arr), linewidth=1.4, label=label)
    for ax in (hist, cdf):
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(unit)
        ax.grid(True, alpha=0.3, which="both")
    hist.set_ylabel("share of samples")
    hist.legend(fontsize=7, loc="upper right")
    cdf.set_ylabel("cumulative share")
    for q in (0.5, 0.99):
        cdf.axhline(q, color="grey", linestyle=":", linewidth=0.8)
        cdf.text(cdf.get_xlim()[0], q, f" p{q * 100:g}", fontsize=7, va="bottom", color="grey")
    fig.suptitle(plot.get("title", plot["id"]), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


def render_timeseries(plot: dict[str, Any], path: Path) -> None:
    """Stacked panels sharing x, with optional reference lines (hlines, vlines) and a symlog y (log)."""
    import matplotlib.pyplot as plt

    panels = plot["panels"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.6 * len(panels) + 0.6), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        for label, data in panel["series"].items():
            if data.get("x"):
                ax.plot(data["x"], data["y"], linewidth=1.2, label=label, marker="." if len(data["x"]) < 40 else None)
        for line in panel.get("hlines", []):
            ax.axhline(line["y"], color="tab:red", linestyle="--", linewidth=0.9, label=line.get("label"))
        for line in panel.get("vlines", []):
            ax.axvline(line["x"], color="grey", linestyle=":", linewidth=1.0, label=line.get("label"))
        if panel.get("log"):
            ax.set_yscale("symlog", linthresh=10)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel(plot.get("xlabel", "s"))
    fig.suptitle(plot.get("title", plot["id"]), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


RENDERERS = {"latency": render_latency, "timeseries": render_timeseries}


# ---- the report


def bench_order(name: str) -> tuple[int, str]:
    return (1 if name == "soak" else 0, name)


def script_title(script: str) -> str:
    """The first line of a bench script's docstring."""
    try:
        doc = ast.get_docstring(ast.parse((ROOT / script).read_text())) or ""
    except (OSError, SyntaxError):
        doc = ""
    return doc.strip().splitlines()[0].rstrip(".").replace("``", "`") if doc.strip() else script


def markdown_tables(lines: list[str]) -> list[str]:
    """Every block of consecutive lines that starts with ``|`` (a markdown table)."""
    tables, current = [], []
    for line in [*lines, ""]:
        if line.lstrip().startswith("|"):
            current.append(line.strip())
        elif current:
            if len(current) >= 2:
                tables.append("\n".join(current))
            current = []
    return tables


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return _fmt(value)
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _rows(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Scalars one per row; a dict (or list element) of scalars on one row as ``key value · ...``."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        value = {str(i + 1): v for i, v in enumerate(value)}
    if not isinstance(value, dict):
        return [(prefix, _scalar(value))]
    nested = any(isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, dict) for x in v))
                 for v in value.values())
    if prefix and not nested:
        return [(prefix, " · ".join(f"{k} {_scalar(v)}" for k, v in value.items()))]
    rows: list[tuple[str, str]] = []
    for key, item in value.items():
        rows += _rows(item, f"{prefix} / {key}" if prefix else str(key))
    return rows


def summary_table(summary: dict[str, Any]) -> str:
    rows = ["| measure | value |", "| --- | --- |"]
    for key, shown in _rows({k: v for k, v in summary.items() if k not in ("bench", "command")}):
        if len(shown) > 400:
            shown = shown[:400] + " …"
        rows.append(f"| {key} | {shown.replace('|', '/')} |")
    return "\n".join(rows)


def human_output(lines: list[str]) -> list[str]:
    """The output without the final JSON line, lines capped in length and number."""
    body = list(lines)
    while body and not body[-1].strip():
        body.pop()
    if body and body[-1].lstrip().startswith("{"):
        body.pop()
    body = [line for line in body if not line.lstrip().startswith("|")]  # the tables are shown above
    body = [line if len(line) <= 400 else line[:400] + " …" for line in body]
    if len(body) > MAX_OUTPUT_LINES:
        body = [f"… ({len(body) - MAX_OUTPUT_LINES} earlier lines in the log)", *body[-MAX_OUTPUT_LINES:]]
    return body


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def machine_section(machine: dict[str, Any]) -> list[str]:
    cpu = machine["cpu"]
    cores = f"{cpu['logical']} logical cores" + (f", {cpu['physical']} physical" if cpu.get("physical") else "")
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
    git = machine["git"]
    return [
        "## Machine", "",
        "| | |", "| --- | --- |",
        f"| CPU | {cpu['model']} ({cores}; {', '.join(cpu['isa']) or 'no AVX2/AVX-512 flags'}) |",
        f"| Memory | {machine['memory_gib']} GiB |",
        f"| GPU | {machine['gpu']} |",
        f"| OS | {machine['os']}, kernel {machine['kernel']} |",
        f"| Python | {machine['python']} |",
        f"| Packages | {packages} |",
        f"| Kafka | {machine['kafka']} (`infra/kafka/kafka.sh`, single-node KRaft on 127.0.0.1), {machine['java']} |",
        f"| Commit | `{git['commit'][:12]}` on {git['branch']}{' (with uncommitted changes)' if git['dirty'] else ''} |",
        f"| Date | {machine['date']} |",
        f"| Load average at start | {' / '.join(f'{x:.2f}' for x in machine['loadavg'])} (1 / 5 / 15 min) |",
        "",
    ]


#: A hand-written section of the report: ``<!-- kept: NAME -->`` ... ``<!-- /kept: NAME -->``.
KEPT = re.compile(r"<!-- kept: (?P<name>[\w-]+) -->\n.*?<!-- /kept: (?P=name) -->\n", re.S)


def kept_sections(text: str) -> dict[str, str]:
    """The hand-written sections of a report, by bench name: numbers measured outside a full
    ``make bench`` (each names its command), which a regeneration keeps until the results
    hold a run of that bench."""
    return {m.group("name"): m.group(0) for m in KEPT.finditer(text)}


def kept_script(name: str, block: str) -> str:
    """The script a hand-written section names first (`` (`tests/bench/...py`) ``), else
    ``tests/bench/bench_NAME.py``: a section may report another bench's runs (``scale_out``:
    ``bench_stream.py --workers``)."""
    found = re.search(r"\(`(tests/bench/[\w/.-]+\.py)[`\s]", block)
    return found.group(1) if found else f"tests/bench/bench_{name}.py"


#: A generated section of a report (``## name``); hand-written ones are titled "name (measured separately)".
SECTION = re.compile(r"^## (?P<name>[\w-]+)\n.*?(?=^## |^<!-- kept: |\Z)", re.S | re.M)
#: The note a section carried over from an earlier run starts with.
EARLIER = "<!-- earlier run -->"


def earlier_sections(text: str) -> dict[str, str]:
    """The generated sections of a previous report, by bench name, each starting with a note
    of the run it comes from (its machine and commit, from that report's Machine section).

    ``make bench --only NAME`` writes the results of NAME alone; the other benches' sections
    are carried over from the report as it was rather than dropped, until a run replaces them.
    """
    body = KEPT.sub("", text)
    machine = dict(re.findall(r"^\| (CPU|Commit|Date) \| (.*?) \|$", body, re.M))
    sections = {m.group("name"): m.group(0) for m in SECTION.finditer(body) if m.group("name") != "Machine"}
    note = (f"{EARLIER}\n*Carried over from an earlier `make bench` (its results are not in this results folder): "
            f"run of {machine.get('Date', 'unknown date')}, commit {machine.get('Commit', 'unknown')}, "
            f"on {machine.get('CPU', 'an unknown CPU')}.*\n")
    out = {}
    for name, block in sections.items():
        heading, _, rest = block.partition("\n")
        out[name] = block if EARLIER in block else f"{heading}\n\n{note}{rest}"
    return out


def build(results: Path, report: Path, plots_dir: Path) -> str:
    runs = sorted((json.loads(p.read_text()) for p in results.glob("*.run.json")), key=lambda r: bench_order(r["name"]))
    machine_path = results / "machine.json"
    machine = json.loads(machine_path.read_text()) if machine_path.exists() else machine_info()
    plots_dir.mkdir(parents=True, exist_ok=True)
    made: set[Path] = set()
    rel = Path(os.path.relpath(plots_dir, report.parent))

    lines = [
        "# simstream benchmarks", "",
        "Generated by `make bench` (`tests/bench/run.py`, then `tests/bench/report.py`): every benchmark under",
        "`tests/bench/` and the soak run, on the machine below. Do not edit by hand. Each command runs from the",
        "repository root with `SIMSTREAM_KAFKA_BOOTSTRAP` (the fresh broker `make bench` starts),",
        f"`SIMSTREAM_MODEL_BASE` and `SIMSTREAM_BENCH_OUT` (results folder, here `{os.path.relpath(results, ROOT)}`)",
        "set. `make bench BENCH_ARGS=\"--only soak\"` reruns some benches and regenerates this file from all results.",
        "Sections marked *measured separately* are hand-written between `<!-- kept: NAME -->` markers; a",
        "regeneration keeps them until the results hold a run of that bench.",
        "",
    ]
    if any(r.get("quick") for r in runs):
        lines += ["> **Quick smoke run** (`--quick`): tiny sizes and durations; these numbers mean nothing.", ""]
    lines += ["| bench | script | status | took |", "| --- | --- | --- | --- |"]
    for run in runs:
        status = "ok" if run["rc"] == 0 else f"**failed (exit {run['rc']})**"
        summary = run.get("summary") or {}
        if "memory_pass" in summary:
            status += f"; memory flat within 10%: **{'PASS' if summary['memory_pass'] else 'FAIL'}**"
        anchor = re.sub(r"[^a-z0-9 _-]", "", run["name"].lower()).replace(" ", "-")
        lines.append(f"| [{run['name']}](#{anchor}) | `{run['script']}` | {status} | {_minutes(run['wall_s'])} |")
    previous = report.read_text() if report.exists() else ""
    ran = {r["name"] for r in runs}
    carried = {name: block for name, block in earlier_sections(previous).items() if name not in ran}
    for name in carried:
        lines.append(f"| [{name}](#{name}) | `tests/bench/{'soak' if name == 'soak' else 'bench_' + name}.py` "
                     "| earlier run (see its section) | |")
    kept = {name: block for name, block in kept_sections(previous).items() if name not in ran}
    for name, block in kept.items():
        lines.append(f"| [{name}](#{name}-measured-separately) | `{kept_script(name, block)}` | measured separately | |")
    lines.append("")
    lines += machine_section(machine)

    for run in runs:
        name = run["name"]
        lines += [f"## {name}", "", f"**{script_title(run['script'])}** (`{run['script']}`).", "",
                  "```bash", run["command"], "```", ""]
        la0, la1 = run.get("loadavg_start", [0])[0], run.get("loadavg_end", [0])[0]
        meta = (f"Ran {run['started']} for {_minutes(run['wall_s'])}, exit status {run['rc']}, "
                f"load average {la0:.2f} at start and {la1:.2f} at end")
        if run.get("git", {}).get("commit") and run["git"]["commit"] != machine["git"]["commit"]:
            meta += f", at commit `{run['git']['commit'][:12]}`"
        lines += [meta + ".", ""]
        log_path = results / f"{name}.log"
        out_lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        tables = markdown_tables(out_lines)
        if tables:
            for table in tables:
                lines += [table, ""]
        elif run.get("summary"):
            lines += [summary_table(run["summary"]), ""]
        samples_path = results / f"{name}.samples.json"
        if samples_path.exists():
            for plot in json.loads(samples_path.read_text()).get("plots", []):
                renderer = RENDERERS.get(plot.get("kind", ""))
                if renderer is None:
                    continue
                png = plots_dir / f"{plot['id']}.png"
                renderer(plot, png)
                made.add(png.resolve())
                lines += [f"![{plot.get('title', plot['id'])}]({(rel / png.name).as_posix()})", ""]
        body = human_output(out_lines)
        if body:
            lines += ["<details><summary>Output</summary>", "", "```text", *body, "```", "", "</details>", ""]
    for block in carried.values():
        lines += [block.rstrip("\n"), ""]
    for block in kept.values():
        lines += [block.rstrip("\n"), ""]
    # The plots of carried-over and hand-written sections stay.
    still_used = {name for block in [*carried.values(), *kept.values()]
                  for name in re.findall(r"\]\((?:[^)]*/)?([\w.-]+\.png)\)", block)}
    for stale in plots_dir.glob("*.png"):
        if stale.resolve() not in made and stale.name not in still_used:
            stale.unlink()
    text = "\n".join(lines).rstrip() + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--report", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "bench",
                        help="folder for the PNGs (emptied of PNGs the report no longer uses)")
    args = parser.parse_args()
    if not any(args.results.glob("*.run.json")):
        sys.exit(f"no results in {args.results}: run make bench (or tests/bench/run.py) first")
    build(args.results, args.report, args.plots)
    print(f"wrote {args.report} (plots in {args.plots})")


if __name__ == "__main__":
    main()
