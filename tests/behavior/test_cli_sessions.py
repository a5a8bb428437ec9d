"""``simstream eval sessions`` on a tiny synthetic click log."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

import streams.cli.behavior_commands  # noqa: F401  (registers the subcommand)
from streams.cli import main


def _write(path: Path, sessions: list[list[str]], t0: float) -> None:
    lines = ["SessionId\tItemId\tTime"]
    for s, items in enumerate(sessions):
        lines += [f"{s}\t{it}\t{t0 + s * 10 + i}" for i, it in enumerate(items)]
    path.write_text("\n".join(lines) + "\n")


def test_eval_sessions_prints_one_json_list(tmp_path: Path) -> None:
    # a -> b -> c is the behaviour pattern; "z" is the popular item
    train = [["a", "b", "c"]] * 5 + [["z", "y"], ["z", "x"], ["z", "w"], ["z", "v"], ["z", "u"], ["z", "t"]]
    _write(tmp_path / "train.tsv", train, 1000.0)
    _write(tmp_path / "test.tsv", [["a", "b", "c"]], 5000.0)
    res = CliRunner().invoke(
        main,
        [
            "eval",
            "sessions",
            "--train",
            str(tmp_path / "train.tsv"),
            "--test",
            str(tmp_path / "test.tsv"),
            "--k",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in json.loads(res.output.strip().splitlines()[-1])}
    assert set(rows) == {"simstream", "popularity", "item-knn"}
    assert rows["simstream"]["n"] == 2
    assert rows["simstream"]["hr@1"] == 1.0
    assert rows["popularity"]["hr@1"] == 0.0


def test_eval_sessions_rejects_bad_header(tmp_path: Path) -> None:
    (tmp_path / "bad.tsv").write_text("a\tb\n")
    res = CliRunner().invoke(
        main, ["eval", "sessions", "--train", str(tmp_path / "bad.tsv"), "--test", str(tmp_path / "bad.tsv")]
    )
    assert res.exit_code != 0
    assert "SessionId" in res.output
