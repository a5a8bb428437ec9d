"""The encoder and evaluation commands, and the matching metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from serving.errors import EncoderUnavailable, InvalidInput
from serving.evaluation.matching_eval import evaluate_rankings, load_truth, top_k_by_cosine
from streams.cli import main

AMAZON = (
    '"id","title","description","manufacturer","price"\n'
    '"a1","adobe photoshop cs3 extended","photo editing caf\xe9","adobe",999.99\n'
    '"a2","norton internet security 2008","","symantec",0\n'
    '"a3","quickbooks pro 2007","accounting","intuit",199.99\n'
    '"a4","","no title","x",1\n'
)
GOOGLE = (
    '"id","name","description","manufacturer","price"\n'
    '"http://g/1","photoshop cs3 extended by adobe","","adobe","1054.99"\n'
    '"http://g/2","symantec norton internet security 2008 3-user","","",59.99\n'
    '"http://g/3","intuit quickbooks pro 2007 win","","intuit","199.99 gbp"\n'
    '"http://g/4","mavis beacon teaches typing","","broderbund",19.99\n'
)
MAPPING = '"idAmazon","idGoogleBase"\n"a1","http://g/1"\n"a2","http://g/2"\n"a3","http://g/3"\n'


@pytest.fixture
def matching_set(tmp_path: Path) -> Path:
    for name, text in (("Amazon.csv", AMAZON), ("GoogleProducts.csv", GOOGLE), ("map.csv", MAPPING)):
        (tmp_path / name).write_bytes(text.encode("latin-1"))
    result = CliRunner().invoke(main, ["convert", "leipzig", "--left", str(tmp_path / "Amazon.csv"),
                                       "--right", str(tmp_path / "GoogleProducts.csv"),
                                       "--mapping", str(tmp_path / "map.csv"), "--out", str(tmp_path / "ag")])
    assert result.exit_code == 0, result.output
    return tmp_path / "ag"


def test_convert_leipzig(matching_set: Path) -> None:
    left = [json.loads(line) for line in (matching_set / "left.jsonl").read_text(encoding="utf-8").splitlines()]
    right = [json.loads(line) for line in (matching_set / "right.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["product_id"] for p in left] == ["a1", "a2", "a3"]  # a4 has no title
    assert left[0] == {"op": "upsert", "product_id": "a1", "ts": 1_700_000_000.0, "title": "adobe photoshop cs3 extended",
                       "description": "photo editing café", "brand": "adobe", "price": 999.99}
    assert "price" not in left[1]  # 0 means unknown in these files
    assert right[2]["price"] == 199.99 and "brand" not in right[1]
    assert load_truth(matching_set / "truth.csv") == {"a1": {"http://g/1"}, "a2": {"http://g/2"}, "a3": {"http://g/3"}}


@pytest.mark.parametrize("method", ["tfidf-word", "tfidf-char", "encoder"])
def test_eval_matching_prints_json_last(matching_set: Path, method: str) -> None:
    args = ["eval", "matching", "--left", str(matching_set / "left.jsonl"), "--right", str(matching_set / "right.jsonl"),
            "--truth", str(matching_set / "truth.csv"), "--method", method, "--k", "2", "--encoder", "hashing"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"method", "n_queries", "hit@1", "hit@2", "mrr@2"}
    assert report["method"] == method and report["n_queries"] == 3
    assert report["hit@1"] >= 2 / 3


def test_eval_matching_compares_every_method_in_one_run(matching_set: Path) -> None:
    args = ["eval", "matching", "--left", str(matching_set / "left.jsonl"), "--right", str(matching_set / "right.jsonl"),
            "--truth", str(matching_set / "truth.csv"), "--method", "all", "--k", "2", "--encoder", "hashing"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["method"] for r in reports] == ["encoder", "tfidf-word", "tfidf-char", "hybrid"]
    assert all(r["n_queries"] == 3 and 0.0 <= r["hit@1"] <= 1.0 for r in reports)


def test_metrics() -> None:
    truth = {"q1": {"a"}, "q2": {"b", "c"}, "q3": {"z"}}
    report = evaluate_rankings("m", ["q1", "q2", "q3"], [["a", "x"], ["x", "c"], ["x", "y"]], truth, 2)
    assert report.n_queries == 3
    assert report.hit_at_1 == pytest.approx(1 / 3)
    assert report.hit_at_k == pytest.approx(2 / 3)
    assert report.mrr_at_k == pytest.approx((1 + 0.5) / 3)
    assert report.as_dict()["mrr@2"] == 0.5
    with pytest.raises(InvalidInput):
        evaluate_rankings("m", [], [], truth, 2)


def test_top_k_by_cosine_orders_best_first() -> None:
    corpus = np.eye(4, dtype=np.float32)
    queries = np.array([[0.1, 0.9, 0.3, 0.0]], dtype=np.float32)
    assert top_k_by_cosine(queries, corpus, 3).tolist() == [[1, 2, 0]]


def test_truth_needs_header(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InvalidInput, match="left_id,right_id"):
        load_truth(tmp_path / "t.csv")


def test_embed_writes_ids_and_unit_vectors(matching_set: Path, tmp_path: Path, model_base: Path) -> None:
    out = tmp_path / "emb"
    result = CliRunner().invoke(main, ["embed", "--in", str(matching_set / "right.jsonl"), "--out", str(out),
                                       "--encoder", "local", "--model-base", str(model_base)])
    assert result.exit_code == 0, result.output
    ids = (out / "ids.txt").read_text().splitlines()
    vectors = np.load(out / "vectors.npy")
    assert ids == ["http://g/1", "http://g/2", "http://g/3", "http://g/4"]
    assert vectors.dtype == np.float32 and vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert "minilm/1" in result.output


@pytest.mark.integration
@pytest.mark.slow
async def test_serve_encoder_command(model_base: Path, tmp_path: Path) -> None:
    from encoders.tfserving import TFServingEncoder

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "simstream"), "serve-encoder", "--model-base", str(model_base),
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    try:
        client = TFServingEncoder(f"127.0.0.1:{port}", timeout_s=2, retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                await client.start()
                break
            except EncoderUnavailable:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "serve-encoder did not come up in 60 s"
                time.sleep(0.5)
        result = await client.encode(["adobe photoshop cs3"])
        assert result.vectors.shape == (1, 384) and result.model_version == "minilm/1"
        await client.close()
    finally:
        proc.terminate()
        proc.wait(15)
