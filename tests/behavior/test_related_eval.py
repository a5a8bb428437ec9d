"""Amazon metadata converter and related-list scoring."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from serving.evaluation.related_eval import convert_amazon_meta, load_truth, score_lists


def test_converter_keeps_only_pairs_inside_the_file(tmp_path: Path) -> None:
    rows = [
        {"asin": "A", "title": "Red card", "also_view": ["B", "Z"], "also_buy": ["C"], "price": "$25.00"},
        {"asin": "B", "title": "Blue card", "also_view": ["A", "A"], "also_buy": [], "price": "10 - 50"},
        {"asin": "C", "title": "Green card", "brand": "Acme", "category": ["Gift Cards", "Gift Cards"]},
        {"asin": "D", "title": ""},  # no title: not a product
    ]
    path = tmp_path / "meta.json.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    upserts, truth = convert_amazon_meta(path)
    assert [u["product_id"] for u in upserts] == ["A", "B", "C"]
    assert upserts[0]["price"] == 25.0 and "price" not in upserts[1]
    assert upserts[2]["category"] == ["Gift Cards"]
    assert truth == [("A", "B", "view"), ("A", "C", "buy"), ("B", "A", "view")]


def test_scores_hit_and_ndcg(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("product_id,related_id,kind\nA,B,view\nA,C,view\nX,Y,buy\n")
    truth = load_truth(p)
    res = {r.kind: r for r in score_lists({"A": ["C", "Q"], "X": ["Q", "R"]}, truth, k=2)}
    assert res["view"].hit == 1.0 and res["view"].n == 1
    assert res["view"].ndcg == pytest.approx(1.0 / (1.0 + 1.0 / 1.5849625007211563))
    assert res["buy"].hit == 0.0 and res["buy"].ndcg == 0.0


def test_convert_and_eval_related_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    import streams.cli.behavior_commands  # noqa: F401  (registers the subcommands)
    from streams.cli import main

    rows = [
        {"asin": "A", "title": "red velvet gift card", "also_view": ["B"]},
        {"asin": "B", "title": "red velvet gift card deluxe", "also_view": ["A"], "also_buy": ["C"]},
        {"asin": "C", "title": "garden hose nozzle", "also_buy": ["B"]},
    ]
    meta = tmp_path / "meta.json"
    meta.write_text("\n".join(json.dumps(r) for r in rows))
    cat, pairs = tmp_path / "c.jsonl", tmp_path / "p.csv"
    runner = CliRunner()
    res = runner.invoke(
        main, ["convert", "giftcards", str(meta), "--out-catalog", str(cat), "--out-truth", str(pairs)]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.splitlines()[-1]) == {"products": 3, "pairs": {"view": 2, "buy": 2}}
    args = [
        "eval",
        "related",
        "--catalog",
        str(cat),
        "--truth",
        str(pairs),
        "--k",
        "1",
        "--encoder",
        "hashing",
    ]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    out = {r["kind"]: r for r in json.loads(res.output.strip().splitlines()[-1])}
    assert out["view"]["hit@1"] == 1.0 and out["view"]["n"] == 2  # A and B name each other
    assert out["buy"]["n"] == 2
    # Every method side by side, on one set of vectors: one row per method and kind.
    res = runner.invoke(main, [*args, "--method", "all"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output.strip().splitlines()[-1])
    assert {(r["method"], r["kind"]) for r in rows} == {
        (m, k) for m in ("encoder", "tfidf-word", "tfidf-char", "hybrid") for k in ("view", "buy")
    }
    by = {(r["method"], r["kind"]): r for r in rows}
    assert by["tfidf-char", "view"]["hit@1"] == 1.0  # A and B share most of their text
