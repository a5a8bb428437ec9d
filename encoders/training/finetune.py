"""Fine-tune the Keras MiniLM on positive pairs and export it as a new SavedModel version.

* **Start point**: the weights of SavedModel version N, read back from its variables (the
  export stores ``net.weights`` in build order), so a fine-tuned version can itself be a base.
* **Loss**: multiple negatives ranking. For a batch of pairs (a_i, b_i) the logits are
  ``cos(a_i, b_j) / temperature``; cross-entropy with target j = i, in both directions
  (a→b and b→a), averaged. Every other pair of the batch is a negative, except known
  positives and repeats of the same item, which are masked out (a false negative would push
  apart what the data says belongs together).
* **Hard negatives** (optional): a mapping from an item to items known or mined to be *not*
  its match (``simstream learn`` passes labelled negatives and the live model's nearest
  non-partners). Each batch then also embeds one hard negative per pair, and every anchor
  ``a_i`` is scored against all of them as extra columns of the a→b logits; a hard negative
  that is a known positive of ``a_i`` is masked like an in-batch one.
* **Optimiser**: AdamW with a linear warm-up to the peak rate, then linear decay to 0.
* **Freezing**: the embeddings and the lowest ``freeze_layers`` transformer layers keep their
  weights; gradients stop below the first trainable layer, so freezing 4 of 6 layers
  roughly halves a step on a CPU and keeps a small data set from overwriting the language
  the model knows.
* **Validation**: hit@10 (and MRR@10, the tie-break once hit@10 saturates) of each held-out
  item's partners among every item with a text, before training and after each epoch.
  The best epoch's weights are kept; training stops after ``patience`` epochs without
  improvement. If no epoch beats the base, the base weights are exported (and it is said).
* **Reproducibility**: one ``seed`` fixes the batch order (the network has no dropout and
  no random initialisation here); TensorFlow's multi-threaded kernels may still differ in
  the last bits between machines.

The GPU is used when TensorFlow sees one; nothing here pins the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoders.base import EMBEDDING_DIM, pack_batch
from encoders.export import export_saved_model, list_versions, read_version_meta, resolve_version
from encoders.tokenizer import WordPieceTokenizer
from encoders.training.pairs import NotEnoughPairs, Pair, PairSet
from serving.errors import ConfigurationError, InvalidInput, ModelMismatch

#: Fewer training pairs than this cannot fill a batch with enough in-batch negatives.
MIN_TRAIN_PAIRS = 8
#: Early stopping needs a validation signal: at least this many held-out pairs.
MIN_VALID_PAIRS = 2
NUM_LAYERS = 6
_MASKED = -1e9

Log = Callable[[str], None]


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters; the defaults fine-tune a catalog of a few thousand items on 2 CPU cores in minutes."""

    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    temperature: float = 0.05
    freeze_layers: int = 0
    train_embeddings: bool = False
    max_length: int = 32
    patience: int = 2
    seed: int = 0
    val_k: int = 10
    #: Stop after this many optimiser steps in all (tests, smoke runs); ``None``: no cap.
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.freeze_layers <= NUM_LAYERS - 1:
            raise InvalidInput(f"--freeze-layers must be in 0..{NUM_LAYERS - 1} (at least one layer must train), "
                               f"got {self.freeze_layers}")
        if self.epochs < 1 or self.batch_size < 2 or self.patience < 1:
            raise InvalidInput("epochs and patience must be >= 1 and batch size >= 2 (in-batch negatives)")
        if not 4 <= self.max_length <= 512:
            raise InvalidInput(f"--max-length must be in 4..512, got {self.max_length}")
        if self.learning_rate <= 0 or self.temperature <= 0 or not 0 <= self.warmup_ratio < 1:
            raise InvalidInput("learning rate and temperature must be > 0 and warm-up ratio in [0, 1)")

    @property
    def min_train_pairs(self) -> int:
        """How many training pairs the run needs: one full batch, and never fewer than ``MIN_TRAIN_PAIRS``."""
        return max(MIN_TRAIN_PAIRS, self.batch_size)


@dataclass
class EpochReport:
    epoch: int
    mean_loss: float | None
    hit_at_k: float
    mrr_at_k: float
    hit_at_1: float
    seconds: float


@dataclass
class FinetuneResult:
    """What a run did: per-step losses, per-epoch validation, the epoch exported, where it went."""

    base_version: int
    version: int
    version_dir: Path
    losses: list[float] = field(default_factory=list)
    epochs: list[EpochReport] = field(default_factory=list)
    best_epoch: int = 0
    train_pairs: int = 0
    valid_pairs: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "base_version": self.base_version,
            "version": self.version,
            "version_dir": str(self.version_dir),
            "train_pairs": self.train_pairs,
            "valid_pairs": self.valid_pairs,
            "steps": len(self.losses),
            "first_loss": round(self.losses[0], 4) if self.losses else None,
            "last_loss": round(self.losses[-1], 4) if self.losses else None,
            "best_epoch": self.best_epoch,
            "epochs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(e).items()}
                       for e in self.epochs],
            "seconds": round(self.seconds, 1),
        }


# --- the network -----------------------------------------------------------------------------
def load_version_model(version_dir: Path) -> Any:
    """A trainable Keras MiniLM holding the weights of an exported SavedModel version."""
    import tensorflow as tf

    from encoders.minilm import build_minilm

    loaded = tf.saved_model.load(str(version_dir))
    stored = list(getattr(loaded, "net_variables", []))
    model = build_minilm()
    if len(stored) != len(model.weights):
        raise ModelMismatch(f"{version_dir} stores {len(stored)} weights, the MiniLM port has {len(model.weights)}; "
                            "only versions written by `simstream export-encoder` or `finetune` can be a base")
    for target, source in zip(model.weights, stored, strict=True):
        if tuple(target.shape) != tuple(source.shape):
            raise ModelMismatch(f"{version_dir}: weight {target.path} has shape {tuple(source.shape)}, "
                                f"the port needs {tuple(target.shape)}")
        target.assign(source.numpy())
    return model


def freeze(model: Any, freeze_layers: int, train_embeddings: bool) -> None:
    """Mark the embeddings (unless trained) and the lowest ``freeze_layers`` blocks non-trainable."""
    model.embeddings.trainable = train_embeddings
    for i, block in enumerate(model.blocks):
        block.trainable = i >= freeze_layers


def warmup_linear(peak: float, warmup: int, total: int) -> Any:
    """A Keras schedule: linear warm-up from 0 to ``peak`` over ``warmup`` steps, then linear decay to 0."""
    import keras
    import tensorflow as tf

    warmup, total = max(1, warmup), max(1, total)

    class WarmupLinear(keras.optimizers.schedules.LearningRateSchedule):  # type: ignore[misc,name-defined]
        def __call__(self, step: Any) -> Any:
            s = tf.cast(step, tf.float32) + 1.0  # Keras counts from 0; the first step gets a non-zero rate
            up = s / float(warmup)
            down = tf.maximum(0.0, (float(total) - s + 1.0) / float(max(1, total - warmup + 1)))
            return peak * tf.minimum(up, tf.minimum(1.0, down))

        def get_config(self) -> dict[str, Any]:
            return {"peak": peak, "warmup": warmup, "total": total}

    return WarmupLinear()


# --- batches -----------------------------------------------------------------------------------
def _negative_masks(batch: Sequence[Pair], positives: set[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Which off-diagonal logits are not true negatives, for rows (a_i vs b_j) and columns (b_i vs a_j)."""
    n = len(batch)
    rows = np.zeros((n, n), dtype=bool)
    cols = np.zeros((n, n), dtype=bool)

    def related(x: str, y: str, own: tuple[str, str]) -> bool:
        return y in own or (min(x, y), max(x, y)) in positives

    for i, p in enumerate(batch):
        for j, q in enumerate(batch):
            if i != j:
                rows[i, j] = related(p.left, q.right, p.key)
                cols[i, j] = related(p.right, q.left, p.key)
    return rows, cols


def hard_negative_batch(batch: Sequence[Pair], hard: Mapping[str, Sequence[str]], positives: set[tuple[str, str]],
                    rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """One hard negative per pair (of its left item, else its right; random among its list), and
    which (anchor i, negative j) logits to ignore: j has no negative (its slot repeats an item),
    or the negative is i's own item, i's partner or a known positive of i."""
    chosen: list[str] = []
    real: list[bool] = []
    for p in batch:
        options = hard.get(p.left) or hard.get(p.right)
        if options:
            chosen.append(options[int(rng.integers(len(options)))])
            real.append(True)
        else:
            chosen.append(p.right)  # a placeholder, masked for every row
            real.append(False)
    n = len(batch)
    ignore = np.zeros((n, n), dtype=bool)
    for i, p in enumerate(batch):
        for j, neg in enumerate(chosen):
            ignore[i, j] = (not real[j] or neg in p.key
                            or (min(p.left, neg), max(p.left, neg)) in positives)
    return chosen, ignore


def _batches(pairs: Sequence[Pair], batch_size: int, rng: np.random.Generator) -> list[list[Pair]]:
    """Shuffled batches of ``batch_size`` pairs; a last batch of fewer than 2 pairs is dropped (no negative)."""
    order = rng.permutation(len(pairs))
    out = [[pairs[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    return [b for b in out if len(b) >= 2]


class _Texts:
    """Token ids of every item, tokenized once."""

    def __init__(self, texts: dict[str, str], tokenizer: WordPieceTokenizer) -> None:
        ids = sorted(texts)
        self.ids = ids
        self.tokens = dict(zip(ids, tokenizer.encode([texts[i] for i in ids]), strict=True))
        self.max_length = tokenizer.max_length

    def pack(self, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return pack_batch([self.tokens[i] for i in items], self.max_length)


def embed_items(model: Any, texts: _Texts, items: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """Unit vectors of ``items`` from the Keras network (length-sorted batches, as the encoders do)."""
    from encoders.base import plan_batches

    out = np.zeros((len(items), EMBEDDING_DIM), dtype=np.float32)
    for idx in plan_batches([len(texts.tokens[i]) for i in items], batch_size):
        ids, mask = texts.pack([items[i] for i in idx])
        out[idx] = np.asarray(model(ids, mask))
    return out


def validation_scores(model: Any, texts: _Texts, valid: Sequence[Pair], k: int) -> tuple[float, float, float]:
    """(hit@k, MRR@k, hit@1) of each validation item's partners among every other item with a text."""
    partners: dict[str, set[str]] = {}
    for p in valid:
        partners.setdefault(p.left, set()).add(p.right)
        partners.setdefault(p.right, set()).add(p.left)
    corpus = texts.ids
    position = {item: i for i, item in enumerate(corpus)}
    vectors = embed_items(model, texts, corpus)
    queries = sorted(partners)
    sims = vectors[[position[q] for q in queries]] @ vectors.T
    sims[np.arange(len(queries)), [position[q] for q in queries]] = -np.inf  # an item is not its own match
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    hit = rr = hit1 = 0.0
    for q, row in zip(queries, top, strict=True):
        for rank, j in enumerate(row, start=1):
            if corpus[j] in partners[q]:
                hit += 1
                rr += 1.0 / rank
                hit1 += rank == 1
                break
    n = max(1, len(queries))
    return hit / n, rr / n, hit1 / n


# --- the run -----------------------------------------------------------------------------------
def check_versions(model_base: Path, base_version: int, out_version: int, *, force: bool) -> Path:
    """Refuse a missing base, ``M == N`` and an existing ``M`` (unless ``force``); return the base's folder."""
    if out_version == base_version:
        raise ConfigurationError(f"--out-version {out_version} is the base version; choose a new number "
                                 f"(e.g. {max(list_versions(model_base), default=base_version) + 1})")
    try:
        _, base_dir = resolve_version(model_base, base_version)
    except ConfigurationError as exc:
        raise ConfigurationError(f"base version missing: {exc}") from exc
    if (model_base / str(out_version)).exists() and not force:
        raise ConfigurationError(f"{model_base / str(out_version)} exists; choose another --out-version "
                                 "or pass --force to replace it")
    return base_dir


def check_pairs(pairs: PairSet, config: FinetuneConfig) -> None:
    """Refuse too few training or validation pairs, saying how many are needed."""
    need = config.min_train_pairs
    if len(pairs.train) < need:
        raise NotEnoughPairs(
            f"{len(pairs.train)} usable training pairs; fine-tuning needs at least {need} "
            f"(one batch of --batch-size {config.batch_size}, and never fewer than {MIN_TRAIN_PAIRS}): "
            "add pair sources or lower --batch-size")
    if len(pairs.valid) < MIN_VALID_PAIRS:
        raise NotEnoughPairs(
            f"{len(pairs.valid)} validation pairs; early stopping needs at least {MIN_VALID_PAIRS}: "
            "rerun `simstream train-pairs` with a larger --holdout")


def finetune(pairs: PairSet, model_base: Path, base_version: int, out_version: int,
             config: FinetuneConfig | None = None, *, force: bool = False, log: Log = print,
             negatives: Mapping[str, Sequence[str]] | None = None,
             meta_extra: Mapping[str, Any] | None = None) -> FinetuneResult:
    """Fine-tune version ``base_version`` on ``pairs`` and export version ``out_version`` beside it.

    ``negatives``: hard negatives per item (ids with a text in ``pairs.texts``; others are
    ignored). ``meta_extra`` is merged into the exported version's ``simstream.json``.
    """
    import keras
    import tensorflow as tf

    cfg = config or FinetuneConfig()
    model_base = Path(model_base).expanduser()
    base_dir = check_versions(model_base, base_version, out_version, force=force)
    check_pairs(pairs, cfg)
    started = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    vocab = base_dir / "assets.extra" / "vocab.txt"
    tokenizer = WordPieceTokenizer(vocab if vocab.is_file() else None, max_length=cfg.max_length)
    texts = _Texts(pairs.texts, tokenizer)
    hard = {item: [n for n in ns if n in texts.tokens and n != item]
            for item, ns in (negatives or {}).items() if item in texts.tokens}
    hard = {item: ns for item, ns in hard.items() if ns}
    model = load_version_model(base_dir)
    freeze(model, cfg.freeze_layers, cfg.train_embeddings)
    trainable = model.trainable_weights
    positives = {p.key for p in pairs.train}

    steps_per_epoch = len(_batches(pairs.train, cfg.batch_size, np.random.default_rng(0)))
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    schedule = warmup_linear(cfg.learning_rate, math.ceil(cfg.warmup_ratio * total), total)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    temperature = float(cfg.temperature)

    spec = [tf.TensorSpec([None, None], tf.int32)] * 4 + [tf.TensorSpec([None, None], tf.bool)] * 2

    @tf.function(input_signature=spec, reduce_retracing=True)
    def step(ids_a: Any, mask_a: Any, ids_b: Any, mask_b: Any, rows: Any, cols: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = pair_loss(model(ids_a, mask_a), model(ids_b, mask_b), rows, cols, temperature)
        grads = tape.gradient(loss, trainable)
        optimizer.apply_gradients(zip(grads, trainable, strict=True))
        return loss

    @tf.function(input_signature=[*spec, tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None], tf.int32),
                                  tf.TensorSpec([None, None], tf.bool)], reduce_retracing=True)
    def step_hard(ids_a: Any, mask_a: Any, ids_b: Any, mask_b: Any, rows: Any, cols: Any,
                  ids_n: Any, mask_n: Any, ignore_n: Any) -> Any:
        with tf.GradientTape() as tape:
            a = model(ids_a, mask_a)
            loss = pair_loss(a, model(ids_b, mask_b), rows, cols, temperature,
                             hard=model(ids_n, mask_n), hard_ignore=ignore_n)
        grads = tape.gradient(loss, trainable)
        optimizer.apply_gradients(zip(grads, trainable, strict=True))
        return loss

    result = FinetuneResult(base_version, out_version, model_base / str(out_version),
                            train_pairs=len(pairs.train), valid_pairs=len(pairs.valid))
    log(f"fine-tuning minilm/{base_version} on {len(pairs.train)} pairs ({len(pairs.valid)} validation, "
        f"{len(texts.ids)} items), {steps_per_epoch} steps/epoch, trainable layers "
        f"{NUM_LAYERS - cfg.freeze_layers}/{NUM_LAYERS}{' + embeddings' if cfg.train_embeddings else ''}, "
        f"{len(tf.config.list_physical_devices('GPU'))} GPU(s), hard negatives for {len(hard)} items")
    t0 = time.perf_counter()
    best = validation_scores(model, texts, pairs.valid, cfg.val_k)
    result.epochs.append(EpochReport(0, None, best[0], best[1], best[2], time.perf_counter() - t0))
    log(f"epoch 0 (base): validation hit@{cfg.val_k} {best[0]:.4f}, mrr@{cfg.val_k} {best[1]:.4f}, "
        f"hit@1 {best[2]:.4f}")
    best_weights = [w.numpy() for w in trainable]
    since_best = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        losses: list[float] = []
        batches = _batches(pairs.train, cfg.batch_size, rng)
        for number, batch in enumerate(batches, start=1):
            if cfg.max_steps is not None and len(result.losses) >= cfg.max_steps:
                break
            ids_a, mask_a = texts.pack([p.left for p in batch])
            ids_b, mask_b = texts.pack([p.right for p in batch])
            rows, cols = _negative_masks(batch, positives)
            if hard:
                chosen, ignore = hard_negative_batch(batch, hard, positives, rng)
                ids_n, mask_n = texts.pack(chosen)
                loss = float(step_hard(ids_a, mask_a, ids_b, mask_b, rows, cols, ids_n, mask_n, ignore))
            else:
                loss = float(step(ids_a, mask_a, ids_b, mask_b, rows, cols))
            if not math.isfinite(loss):
                raise InvalidInput(f"the loss became {loss} at step {len(result.losses) + 1}; "
                                   "lower --learning-rate or raise --temperature")
            losses.append(loss)
            result.losses.append(loss)
            log(f"epoch {epoch} step {number}/{len(batches)} loss {loss:.4f} "
                f"lr {float(schedule(optimizer.iterations - 1)):.2e}")
        scores = validation_scores(model, texts, pairs.valid, cfg.val_k)
        mean = float(np.mean(losses)) if losses else None
        result.epochs.append(EpochReport(epoch, mean, scores[0], scores[1], scores[2], time.perf_counter() - t0))
        improved = scores[:2] > best[:2]  # hit@k first, MRR@k breaks ties once hit@k saturates
        log(f"epoch {epoch}: mean loss {mean if mean is None else round(mean, 4)}, validation "
            f"hit@{cfg.val_k} {scores[0]:.4f}, mrr@{cfg.val_k} {scores[1]:.4f}, hit@1 {scores[2]:.4f}"
            f"{' (best)' if improved else ''}, {time.perf_counter() - t0:.1f} s")
        if improved:
            best, since_best, result.best_epoch = scores, 0, epoch
            best_weights = [w.numpy() for w in trainable]
        else:
            since_best += 1
        if since_best >= cfg.patience:
            log(f"early stop: no validation gain for {cfg.patience} epoch(s); keeping epoch {result.best_epoch}")
            break
        if cfg.max_steps is not None and len(result.losses) >= cfg.max_steps:
            break
    for w, value in zip(trainable, best_weights, strict=True):
        w.assign(value)
    if result.best_epoch == 0:
        log("no epoch beat the base on validation; the exported version has the base weights")

    base_meta = read_version_meta(base_dir)
    meta = {
        "weights": f"fine-tuned from {base_meta.get('model_name', 'minilm')}/{base_version}",
        "base_version": base_version,
        "finetune": {**asdict(cfg), "best_epoch": result.best_epoch, "train_pairs": len(pairs.train),
                     "valid_pairs": len(pairs.valid), "hard_negative_items": len(hard),
                     "validation": {f"hit@{cfg.val_k}": round(best[0], 4), f"mrr@{cfg.val_k}": round(best[1], 4)}},
    }
    meta.update(meta_extra or {})
    export_max_length = int(base_meta.get("max_length", 128))
    _, result.version_dir = export_saved_model(model_base, version=out_version, max_length=export_max_length,
                                               model=model, overwrite=force, meta_extra=meta,
                                               vocab_path=vocab if vocab.is_file() else None)
    result.seconds = time.perf_counter() - started
    log(f"exported minilm/{out_version} -> {result.version_dir} ({result.seconds:.0f} s in all)")
    return result


def pair_loss(a: Any, b: Any, rows: Any, cols: Any, temperature: float, *, hard: Any = None,
              hard_ignore: Any = None) -> Any:
    """Symmetric multiple-negatives ranking loss of unit vectors ``a``, ``b`` ``[n, dim]``; masked logits ignored.

    ``hard`` (``[m, dim]``) adds hard negatives as extra columns of the a→b direction;
    ``hard_ignore`` (``[n, m]``) masks those that are not negatives of a row.
    """
    import tensorflow as tf

    logits = tf.matmul(a, b, transpose_b=True) / temperature
    labels = tf.range(tf.shape(a)[0])
    forward = tf.where(rows, _MASKED, logits)
    backward = tf.where(cols, _MASKED, tf.transpose(logits))
    if hard is not None:
        extra = tf.where(hard_ignore, _MASKED, tf.matmul(a, hard, transpose_b=True) / temperature)
        forward = tf.concat([forward, extra], axis=1)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits
    return 0.5 * (tf.reduce_mean(ce(labels, forward)) + tf.reduce_mean(ce(labels, backward)))


def batch_loss(model: Any, pairs: PairSet, max_length: int = 32, temperature: float = 0.05) -> float:
    """The loss of all training pairs as one batch, without a step (to show training lowers it)."""
    tokenizer = WordPieceTokenizer(max_length=max_length)
    texts = _Texts(pairs.texts, tokenizer)
    batch = list(pairs.train)
    rows, cols = _negative_masks(batch, {p.key for p in batch})
    a = model(*texts.pack([p.left for p in batch]))
    b = model(*texts.pack([p.right for p in batch]))
    return float(pair_loss(a, b, rows, cols, temperature))
