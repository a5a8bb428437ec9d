"""Prometheus metrics of one worker, on a registry of its own (so tests can run several apps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Metrics:
    """Counters and histograms the worker exposes on ``/metrics``."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.events = Counter(
            "simstream_events_total", "Input events by topic and outcome", ["topic", "outcome"], registry=r
        )
        self.dead_letters = Counter(
            "simstream_dead_letters_total", "Events written to the dead-letter topic", ["topic"], registry=r
        )
        self.published = Counter(
            "simstream_published_total", "Records published, by output topic", ["topic"], registry=r
        )
        self.encoder_batch_size = Histogram(
            "simstream_encoder_batch_size", "Texts per encoder call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r,
        )
        self.encoder_outages = Counter(
            "simstream_encoder_outages_total", "Encoder calls that found it unavailable (then retried)", registry=r
        )
        self.pending_changes = Gauge(
            "simstream_pending_text_changes", "Text changes deferred while the encoder is unreachable", registry=r
        )
        self.encoder_latency = Histogram(
            "simstream_encoder_seconds", "Latency of one encoder call", registry=r
        )
        self.snapshot_pause = Histogram(
            "simstream_snapshot_pause_seconds",
            "How long a snapshot held the stream between two batches (the fork, or the whole save "
            "without SIMSTREAM_SNAPSHOT_FORK)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0), registry=r,
        )
        self.catalog_size = Gauge("simstream_catalog_products", "Live products in the catalog", registry=r)
        self.unknown_product_events = Counter(
            "simstream_user_events_unknown_product", "User events naming a product not in the catalog", registry=r
        )
        self.forgotten_users = Counter("simstream_users_forgotten", "Forget events applied", registry=r)
        self.behavior_dirty = Gauge("simstream_behavior_dirty_items", "Items waiting for their debounce", registry=r)
        self.index_live = Gauge("simstream_index_live", "Live vectors in the index", registry=r)
        self.index_deleted = Gauge("simstream_index_deleted", "Deleted-but-not-reclaimed index entries", registry=r)
        self.rollover_progress = Gauge(
            "simstream_rollover_progress", "Share of the catalog re-embedded by the running model rollover (0 to 1)",
            registry=r,
        )
        self.rollover_active = Gauge("simstream_rollover_active", "1 while a model rollover runs", registry=r)
        self.rollovers = Counter(
            "simstream_rollovers_total", "Model rollovers by outcome (swapped, refused, failed)", ["outcome"], registry=r
        )
        self.learn_runs = Counter(
            "simstream_learn_runs_total", "Learning-loop runs by decision (promoted, refused, skipped, failed)",
            ["decision"], registry=r)
        self.learn_heldout_hit1 = Gauge(
            "simstream_learn_heldout_hit_at_1", "Held-out hit@1 of the last learning run that trained, by model "
            "(live, candidate, tfidf_char)", ["model"], registry=r)
        self.learn_pairs = Gauge("simstream_learn_pairs", "Positive pairs the last learning run found, by source",
                                 ["source"], registry=r)
        self.model_info = Gauge("simstream_model_info", "The live model version (value 1)", ["model_version"], registry=r)
        self.owned_partitions = Gauge(
            "simstream_owned_partitions", "product-changes partitions whose lists this worker publishes", registry=r
        )
        self.replica_lag = Gauge(
            "simstream_replica_lag_records", "Records of a state topic the replica has not applied yet", ["topic"],
            registry=r,
        )
        self.replica_pending = Gauge(
            "simstream_replica_pending_embeddings", "Replicated products waiting for their embedding record",
            registry=r,
        )
        self.freshness = Histogram(
            "simstream_freshness_seconds", "Event timestamp to publication of its own list",
            ["topic"], buckets=FRESHNESS_BUCKETS, registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
