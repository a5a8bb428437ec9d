"""``make bench --only NAME`` regenerates BENCHMARKS.md without losing the other benches' sections."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.report import build

PREVIOUS = """# simstream benchmarks

| bench | script | status | took |
| --- | --- | --- | --- |
| [core](#core) | `tests/bench/bench_core.py` | ok | 5.2 min |

## Machine

| | |
| --- | --- |
| CPU | Some CPU (2 logical cores) |
| Commit | `abc123` on main |
| Date | 2026-11-28T11:53:29+00:00 |

## core

**Core bench** (`tests/bench/bench_core.py`).

| products | apply p99 ms |
| --- | --- |
| 100,000 | 9.1 |

![Apply latency](docs/bench/core-apply.png)

<!-- kept: search -->
## search (measured separately)

Hand-written numbers.
<!-- /kept: search -->

<!-- kept: scale_out -->
## scale_out (measured separately)

**Two workers against one** (`tests/bench/bench_stream.py --workers 2`).
<!-- /kept: scale_out -->
"""


def test_a_partial_run_carries_the_earlier_sections_and_their_plots(tmp_path: Path) -> None:
    results, plots = tmp_path / "results", tmp_path / "docs" / "bench"
    results.mkdir()
    plots.mkdir(parents=True)
    (plots / "core-apply.png").write_bytes(b"png")
    (plots / "orphan.png").write_bytes(b"png")
    (results / "stream.run.json").write_text(json.dumps({
        "name": "stream", "script": "tests/bench/bench_stream.py", "command": "bench_stream.py --products 10",
        "rc": 0, "wall_s": 60.0, "started": "2026-11-30T18:57:42+00:00", "summary": {"products": 10}}))
    (results / "stream.log").write_text("| rate | p99 |\n| --- | --- |\n| 10 | 5 |\n")
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(PREVIOUS)

    text = build(results, report, plots)

    assert "## stream" in text and "| 10 | 5 |" in text
    assert "## core" in text and "| 100,000 | 9.1 |" in text, "the earlier run's section is kept"
    assert "run of 2026-11-28T11:53:29+00:00, commit `abc123` on main, on Some CPU" in text
    assert "| [core](#core) | `tests/bench/bench_core.py` | earlier run" in text
    assert "<!-- kept: search -->" in text and "Hand-written numbers." in text
    assert "| [search](#search-measured-separately) | `tests/bench/bench_search.py` | measured separately |" in text
    assert "| [scale_out](#scale_out-measured-separately) | `tests/bench/bench_stream.py` | measured separately |" in text, (
        "a hand-written section names the script it reports"
    )
    assert (plots / "core-apply.png").exists() and not (plots / "orphan.png").exists()
    again = build(results, report, plots)
    assert again.count("Carried over from an earlier") == 1, "carried once, not noted again at each regeneration"
