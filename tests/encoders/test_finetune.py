"""Fine-tuning: a tiny run lowers the loss and exports version 2 beside 1 with the same contract; bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from encoders.training.finetune import FinetuneConfig, check_pairs, finetune
from encoders.training.pairs import NotEnoughPairs, Pair, PairSet
from serving.errors import ConfigurationError
from streams.cli import main

# Arbitrary associations the base model cannot know, so the loss starts high and must fall.
LEFT = ["amber lantern", "quiet harbor", "copper kettle", "velvet meadow", "frozen compass",
        "silent trumpet", "paper dragon", "marble orchard", "rusty anchor", "golden spindle"]
RIGHT = ["code 7741", "zx-220 module", "alpha flange", "kit b-19", "series q4", "unit m88", "part 3c", "set 900k",
         "rev 12a", "model t7"]


def _pairs(n_train: int = 8) -> PairSet:
    texts = {f"l{i}": t for i, t in enumerate(LEFT)} | {f"r{i}": t for i, t in enumerate(RIGHT)}
    pairs = [Pair.of(f"l{i}", f"r{i}", "test") for i in range(len(LEFT))]
    return PairSet(pairs[:n_train], pairs[n_train:], texts)


@pytest.fixture
def base(model_base: Path, tmp_path: Path) -> Path:
    """A model base of our own holding version 1 (a link to the session's export, never written to)."""
    own = tmp_path / "minilm"
    own.mkdir()
    (own / "1").symlink_to(model_base / "1", target_is_directory=True)
    return own


def test_tiny_finetune_lowers_the_loss_and_exports_a_version_with_the_same_contract(base: Path) -> None:
    from encoders.export import list_versions, read_signature_defs
    from encoders.local import LocalEncoder
    from encoders.verify import verify_model

    config = FinetuneConfig(epochs=4, batch_size=8, learning_rate=3e-4, freeze_layers=4, max_length=12,
                            patience=4, seed=0)
    logged: list[str] = []
    result = finetune(_pairs(), base, 1, 2, config, log=logged.append)
    # One batch holds every training pair, so each step's loss is the same batch's loss.
    assert len(result.losses) == 4
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses
    assert any("step 1/1 loss" in line for line in logged) and any("validation hit@10" in line for line in logged)
    assert list_versions(base) == [1, 2]
    one, two = (read_signature_defs(base / str(v))["serving_default"] for v in (1, 2))
    assert one.inputs == two.inputs and one.outputs == two.outputs and one.method_name == two.method_name
    assert verify_model(base / "2").dim == 384
    meta = json.loads((base / "2" / "assets.extra" / "simstream.json").read_text(encoding="utf-8"))
    assert meta["base_version"] == 1 and meta["max_length"] == 128 and meta["dim"] == 384
    vectors = LocalEncoder(base, model_version=2).encode_blocking(["amber lantern", "code 7741"]).vectors
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_too_few_pairs_says_how_many_are_needed() -> None:
    with pytest.raises(NotEnoughPairs, match="3 usable training pairs; fine-tuning needs at least 16"):
        check_pairs(_pairs(3), FinetuneConfig(batch_size=16))
    with pytest.raises(NotEnoughPairs, match="at least 8"):
        check_pairs(_pairs(3), FinetuneConfig(batch_size=4))
    empty_valid = PairSet(_pairs(10).train, [], _pairs().texts)
    with pytest.raises(NotEnoughPairs, match="0 validation pairs; early stopping needs at least 2"):
        check_pairs(empty_valid, FinetuneConfig(batch_size=4))


def test_missing_base_existing_out_version_and_same_version_are_refused(base: Path) -> None:
    config = FinetuneConfig(batch_size=4)
    with pytest.raises(ConfigurationError, match="base version missing: version 7 is not under"):
        finetune(_pairs(), base, 7, 8, config)
    with pytest.raises(ConfigurationError, match="is the base version"):
        finetune(_pairs(), base, 1, 1, config)
    (base / "2").mkdir()
    with pytest.raises(ConfigurationError, match="exists; choose another --out-version or pass --force"):
        finetune(_pairs(), base, 1, 2, config)


def test_finetune_command_reports_too_few_pairs(tmp_path: Path, base: Path) -> None:
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "texts.jsonl").write_text('{"product_id": "a", "text": "a"}\n{"product_id": "b", "text": "b"}\n',
                                       encoding="utf-8")
    (pairs / "train.csv").write_text("left_id,right_id,source\na,b,x\na,ghost,x\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["finetune", "--pairs", str(pairs), "--base-version", "1",
                                       "--out-version", "2", "--model-base", str(base)])
    assert result.exit_code == 1
    assert "1 pairs name an id without a text" in result.stderr
    assert "1 usable training pairs; fine-tuning needs at least 32" in result.stderr


def test_hard_negatives_are_masked_where_they_are_not_negatives() -> None:
    from encoders.training.finetune import hard_negative_batch

    batch = [Pair.of("l0", "r0", "t"), Pair.of("l1", "r1", "t"), Pair.of("l2", "r2", "t")]
    positives = {p.key for p in batch} | {("l0", "r9")}
    hard = {"l0": ["r9"], "l1": ["r2"]}  # r9 is a known positive of l0; r2 is l2's own partner
    chosen, ignore = hard_negative_batch(batch, hard, positives, np.random.default_rng(0))
    assert chosen == ["r9", "r2", "r2"]  # l2 has none: its slot repeats its partner and is masked
    assert ignore.tolist() == [[True, False, True],   # l0: r9 is its positive
                               [False, False, True],  # l1: r2 is a negative
                               [False, True, True]]   # l2: r2 is its partner


def test_a_finetune_with_hard_negatives_lowers_the_loss_and_records_them(base: Path) -> None:
    config = FinetuneConfig(epochs=3, batch_size=8, learning_rate=3e-4, freeze_layers=4, max_length=12,
                            patience=3, seed=0)
    negatives = {f"l{i}": [f"r{(i + 1) % 8}"] for i in range(8)}
    logged: list[str] = []
    result = finetune(_pairs(), base, 1, 2, config, log=logged.append, negatives=negatives,
                      meta_extra={"note": "hard"})
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    assert any("hard negatives for 8 items" in line for line in logged), logged[:2]
    meta = json.loads((base / "2" / "assets.extra" / "simstream.json").read_text(encoding="utf-8"))
    assert meta["finetune"]["hard_negative_items"] == 8 and meta["note"] == "hard"
