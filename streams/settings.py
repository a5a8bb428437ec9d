"""The one frozen settings object. Every field is an environment variable ``SIMSTREAM_<NAME>``.

The core (``serving/``, ``encoders/``) never reads the environment: the worker builds its
configuration objects from this one ``Settings`` and passes them down. ``Settings.describe()``
is what ``simstream --help`` lists, and ``configuration_markdown()`` renders it as
``docs/configuration.md`` (``make docs``; a test checks that the file is current).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.kinds import spec_of

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def default_model_base() -> Path:
    """Where ``make`` exports the encoder SavedModel by default (outside the repo, a cache)."""
    return Path.home() / ".cache" / "simstream" / "models" / "minilm"


class Settings(BaseSettings):
    """All runtime configuration of a simstream worker and its CLI."""

    model_config = SettingsConfigDict(env_prefix="SIMSTREAM_", frozen=True, extra="ignore")

    # --- Kafka connection -------------------------------------------------------------
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, comma separated host:port."
    )
    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    kafka_ssl_cafile: Path | None = Field(None, description="CA bundle to verify the brokers (SSL).")
    kafka_ssl_certfile: Path | None = Field(None, description="Client certificate (mutual TLS).")
    kafka_ssl_keyfile: Path | None = Field(None, description="Client private key (mutual TLS).")
    kafka_ssl_check_hostname: bool = Field(True, description="Check the broker's hostname against its certificate.")
    kafka_sasl_mechanism: SaslMechanism = Field("PLAIN", description="SASL mechanism when a SASL protocol is used.")
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    kafka_session_timeout_s: float = Field(
        60.0, ge=6, le=300,
        description="Consumer-group session timeout: how long a crashed worker keeps its partitions before "
        "the others take them over.",
    )

    # --- Topics -------------------------------------------------------------------------
    app_id: str = Field("simstream", description="Faust app id; also the Kafka consumer group.")
    topic_product_changes: str = Field("product-changes", description="Input: product upserts and deletes.")
    topic_user_events: str = Field("user-events", description="Input: shopper behaviour events.")
    topic_similar_items: str = Field("similar-items", description="Output (compacted): similar items per product.")
    topic_substitutes: str = Field("substitutes", description="Output (compacted): in-stock substitutes per product.")
    topic_complements: str = Field("complements", description="Output (compacted): bought-together items per product.")
    topic_duplicates: str = Field(
        "duplicates", description="Output (compacted): the other listings of the same product, per product."
    )
    topic_user_recommendations: str = Field("user-recommendations", description="Output: per-user feeds.")
    topic_dead_letters: str = Field("simstream-dead-letters", description="Output: events that could not be processed.")
    topic_products: str = Field("simstream-products", description="Internal (compacted): merged catalog state.")
    topic_embeddings: str = Field("simstream-embeddings", description="Internal (compacted): vectors per product.")
    topic_pair_updates: str = Field(
        "simstream-pair-updates", description="Internal: behaviour pair updates, keyed (repartitioned) by item."
    )
    topic_lexical: str = Field(
        "simstream-lexical", description="Internal (compacted, one partition): the lexical IDF every worker shares."
    )
    topic_product_labels: str = Field(
        "product-labels", description="Input (compacted, optional): labelled pairs `{left_id, right_id, label}` that "
                                      "`simstream learn` trains on; label 0 marks a negative.")
    topic_models: str = Field(
        "simstream-models", description="Output (compacted, one partition): one record per `simstream learn` run: "
                                        "pairs used, held-out scores of live and candidate, promoted or refused and why.")
    topic_competitor_offers: str = Field(
        "competitor-offers", description="Input (one partition): competitors' offers `{op, competitor, offer_id, title, "
                                         "brand, price, currency, url, ts}`, keyed `competitor|offer_id`.")
    topic_offer_matches: str = Field(
        "offer-matches", description="Output (compacted): each competitor offer's best own product, confidence, price "
                                     "gap and reasons, or `no_match`; keyed `competitor|offer_id`.")
    topic_competitor_prices: str = Field(
        "competitor-prices", description="Output (compacted): per own product, the competitors' matched offers and "
                                         "their prices.")
    topic_partitions: int = Field(6, ge=1, le=1024, description="Partitions for topics that `topics create` makes.")
    topic_replication: int = Field(1, ge=1, le=16, description="Replication factor for topics that `topics create` makes.")

    # --- Encoder ------------------------------------------------------------------------
    encoder: str = Field(
        "local",
        description="`local` (SavedModel in-process), `grpc://host:port` (TF Serving), or `hashing` (deterministic test twin).",
    )
    model_base: Path = Field(default_factory=default_model_base, description="SavedModel base directory (`<base>/<version>/`).")
    model_name: str = Field("minilm", description="Model name as TF Serving serves it.")
    model_version: int | None = Field(None, ge=1, description="Pin a model version; unset means the latest.")
    max_length: int = Field(128, ge=8, le=512, description="Tokens per text before truncation.")
    encoder_timeout_s: float = Field(5.0, gt=0, le=300, description="Deadline of one encoder call (gRPC).")
    encoder_retries: int = Field(4, ge=0, le=20, description="Retries on UNAVAILABLE or DEADLINE_EXCEEDED (gRPC).")
    embed_batch_size: int = Field(64, ge=1, le=4096, description="Texts per encoder call. The stream takes up to four such batches of product changes "
                    "at once and embeds the next while the core applies the previous.")
    embed_batch_within_s: float = Field(0.05, gt=0, le=10, description="How long the stream waits to fill a batch.")
    model_poll_interval_s: float = Field(
        30.0, ge=0, le=86400,
        description="With SIMSTREAM_MODEL_VERSION unset: seconds between checks for a newer model version "
        "(TF Serving's GetModelStatus, or the model base for `local`), which starts a live rollover; 0 disables.",
    )
    model_blend: bool = Field(
        True, description="Use the lexical weight, lexical floor and behaviour weight that a model version carries "
                          "(fitted on the shop's pairs by `simstream learn`) instead of SIMSTREAM_LEXICAL_WEIGHT, "
                          "SIMSTREAM_LEXICAL_FLOOR and SIMSTREAM_BEHAVIOR_WEIGHT; a version without one uses those.")
    learn_interval_s: float = Field(
        21600.0, ge=0, le=30 * 86400,
        description="Seconds between runs of the learning loop (`simstream learn`, in a separate process) started by "
                    "the worker that owns product-changes partition 0; the first run is one interval after the "
                    "start. 0 disables (run `simstream learn` from a scheduler instead).")
    learn_min_new_pairs: int = Field(
        200, ge=0, description="The learning loop trains only when at least this many positive pairs are new since "
                               "its last training run.")
    learn_min_gain: float = Field(
        0.01, ge=-1, le=1, description="A fine-tuned candidate is promoted only when its held-out hybrid hit@1 beats "
                                       "the live version's by at least this much (0.01 = one point).")
    learn_max_steps: int | None = Field(
        None, ge=1, description="The learning loop's training budget: optimiser steps per run (unset: the epochs "
                                "and early stopping decide).")
    learn_freeze_layers: int = Field(
        0, ge=0, le=5, description="The learning loop's runs keep the encoder's lowest layers frozen (of 6): each one "
                                   "frozen takes its share of the backward pass off a CPU-only run, at some cost in "
                                   "what the run can learn (`simstream learn --freeze-layers`).")
    rollover_batch_size: int = Field(256, ge=1, le=8192, description="Products re-embedded per encoder call during a model rollover.")
    rollover_pause_s: float = Field(
        0.0, ge=0, le=60, description="Pause between rollover batches, to leave encoder capacity to the live stream."
    )

    # --- Recommendations ----------------------------------------------------------------
    k: int = Field(10, ge=1, le=200, description="Items per published list.")
    candidate_depth: int = Field(50, ge=1, le=2000, description="Dense candidates fetched from HNSW before re-ranking.")
    lexical_weight: float = Field(0.6, ge=0, le=1, description="Share of the lexical evidence in the content score "
                                  "(default chosen on every shared evaluation set: docs/quality.md).")
    lexical_floor: float = Field(0.4, ge=0, lt=1, description="Lexical cosines at or below this count as no lexical "
                                 "evidence; above it the evidence is (cosine - floor) / (1 - floor).")
    behavior_weight: float = Field(0.0, ge=0, le=1, description="Share of behaviour in the final score.")
    collapse_duplicates: bool = Field(
        True, description="List one of several listings of the same product (same brand and title words, or the "
                          "same brand and model code; variants of one group excepted): the best ranked stays and "
                          "names the others in its reasons as `duplicate_of: <id>`.")
    duplicate_threshold: float = Field(
        0.66, gt=0, le=2, description="Content score at which two listings count as one product on the `duplicates` "
        "topic, besides the textual rule (calibrated on Amazon-Google with `simstream eval duplicates`: "
        "docs/quality.md); above 1 the textual rule alone decides.")
    duplicate_max_items: int = Field(
        20, ge=1, le=1000, description="Most items a `duplicates` list holds, the best first (a product listed "
        "hundreds of times would otherwise republish hundreds of items on every change of one listing).")
    price_band: float = Field(0.3, ge=0, le=10, description="Substitutes' price may differ by at most this fraction.")
    hnsw_ef: int = Field(400, ge=10, le=5000, description="HNSW ef at query time: about 6x the neighbours a list "
                         "search asks for (candidate depth + 16), so the dense candidates are those of an exact search "
                         "even in crowded regions of a large catalog (docs/performance.md, seventh round).")
    exact_build_limit: int = Field(
        200_000, ge=0, description="A bulk load (bootstrap, restore without lists, handover) checks every owner's HNSW "
        "search against all owners' vectors with block matrix products while the owners number at most this many, so the "
        "lists start exact; the cost grows with the square of the catalog (about 90 s on one core at 100k).")
    join_in_child: bool = Field(
        True, description="A bootstrap's settle or a bulk load runs the duplicates join in a forked child process "
        "(copy-on-write, like a snapshot) while the worker builds the candidate buffers: the two halves of that work "
        "use two cores. false: both on the core thread, one after the other (platforms without fork never fork).")
    index: str = Field(
        "hnsw", description="Vector index adapter by name (`serving.index.INDEX_ADAPTERS`): `hnsw` (hnswlib, "
                            "approximate) or `exact` (brute force, for small catalogs and audits).")
    hnsw_m: int = Field(16, ge=4, le=128, description="HNSW M (graph degree).")

    # --- Behaviour and feeds ---------------------------------------------------------------
    session_gap_s: float = Field(1800.0, gt=0, le=86400, description="Inactivity that ends a session without session_id.")
    behavior_half_life_s: float = Field(7 * 86400.0, gt=0, description="Half-life of co-occurrence counts.")
    behavior_top_n: int = Field(100, ge=1, le=1000, description="Behaviour partners kept per item (and per row published).")
    behavior_max_items: int = Field(200_000, ge=1, description="Items with behaviour rows kept (least recent evicted).")
    behavior_max_sessions: int = Field(100_000, ge=1, description="Open sessions kept (least recent evicted).")
    behavior_debounce_ms: int = Field(
        500, ge=0, le=600_000, description="A hot item's lists republish at most once per interval; the last state always."
    )
    feed_k: int = Field(20, ge=1, le=100, description="Items per user feed.")
    feed_history_len: int = Field(20, ge=1, le=200, description="Events kept per user.")
    feed_history_ttl_s: float = Field(7 * 86400.0, gt=0, description="History older than this is ignored.")
    feed_max_per_group: int = Field(1, ge=1, le=100, description="Feed diversity: items per group_id in the top 10.")
    feed_max_per_leaf: int = Field(3, ge=1, le=100, description="Feed diversity: items per leaf category in the top 10.")
    feed_max_users: int = Field(100_000, ge=1, description="Users with a history kept (least recent evicted).")

    # --- Worker ------------------------------------------------------------------------
    data_dir: Path = Field(Path("./var/simstream"), description="Faust tables and index snapshots live here.")
    snapshot_interval_s: float = Field(300.0, ge=0, description="Seconds between index snapshots (0 disables).")
    snapshot_fork: bool = Field(True, description="Write snapshots from a forked child process (copy-on-write, as Redis does): ingestion pauses only for the fork, tens of milliseconds, instead of the whole write (seconds at 100k products). Memory grows meanwhile by the pages the stream changes. false: written on the core thread, pausing ingestion.")
    lexical_refit_quiet_s: float = Field(
        60.0, ge=0,
        description="Refit the shared lexical IDF once the catalog has more than doubled since its fit and no "
                    "product change arrived for this long (0: only `simstream refit-lexical` refits).")
    idf_wait_s: float = Field(
        300.0, ge=0,
        description="At the end of a bulk catch-up (a group's bootstrap), a worker that does not refit the shared "
                    "IDF itself waits up to this long for the one the owner of partition 0 is about to publish before it "
                    "settles: settled with a stale IDF, every list would be rebuilt again when the new one arrives, and "
                    "the duplicates join is several times slower without one (0: never waits).")
    progress_interval_s: float = Field(
        10.0, gt=0, le=3600,
        description="Seconds between input progress reports: lag, rate and time to catch up in /stats "
                    "(`input`), and a log line while the worker is behind (a bootstrap, a burst).")
    bulk_catch_up_min: int = Field(
        2000, ge=0,
        description="Bulk catch-up: while the product-changes backlog holds at least this many text changes and "
                    "at least a quarter of the catalog's worth (a bootstrap, a big import; estimated from the recent "
                    "share of changes that need the encoder, so a stock and price backlog never starts one), "
                    "changes are merged without updating lists, and every list is rebuilt and published once when "
                    "the backlog is gone (0 disables).")
    shutdown_drain_s: float = Field(
        30.0, ge=0, le=600,
        description="On SIGTERM/SIGINT: how long the batches in flight may take to publish, be acknowledged and "
                    "committed before the worker exits anyway.")
    web_host: str = Field("127.0.0.1", description="Interface of the web server (read API, /health, /metrics).")
    web_port: int = Field(6066, ge=1, le=65535, description="Port of the web server.")
    web_token: SecretStr | None = Field(None, description="Bearer token required on every endpoint but /health.")
    search_cache_size: int = Field(
        1024, ge=0, le=1_000_000,
        description="Embeddings of the most recent distinct `/search` queries kept (least recently used evicted; "
                    "about 1.5 KB each); 0 embeds every query.")
    offer_match_threshold: float = Field(
        0.4072, ge=0, le=1, description="Confidence below which a competitor offer is published with `no_match`. "
                                        "The default is the threshold of best F1 on the validation half of "
                                        "Amazon-Google for the zero-shot encoder (`simstream eval offers`, which "
                                        "prints the values for any version).")
    offer_confidence_slope: float = Field(
        2.5923, gt=0, le=1000, description="Offer confidence = 1 / (1 + exp(-(slope * content score - price weight * "
                                         "log price gap + intercept))): a logistic regression fitted by "
                                         "`simstream eval offers`.")
    offer_confidence_intercept: float = Field(
        -0.7131, ge=-1000, le=1000, description="The intercept of the offer confidence's logistic curve (see "
                                              "`SIMSTREAM_OFFER_CONFIDENCE_SLOPE`).")
    offer_confidence_price_weight: float = Field(
        2.2105, ge=0, le=1000, description="How much a price gap lowers the offer confidence: the curve's term "
                                        "`- weight * min(abs(ln(offer price / own price)), 3)`.")
    offer_unknown_price_gap: float = Field(
        0.1859, ge=0, le=3, description="The log price gap assumed when the offer's or the product's price is unknown "
                                     "(or the currencies differ): the median gap of the calibration set.")
    max_message_bytes: int = Field(1_000_000, ge=1024, le=50_000_000, description="Larger input messages are dead-lettered.")
    log_level: str = Field("info", description="Worker log level.")

    @field_validator("index")
    @classmethod
    def _known_index(cls, value: str) -> str:
        from serving.index import INDEX_ADAPTERS

        if value not in INDEX_ADAPTERS:
            raise ValueError(f"must be one of {sorted(INDEX_ADAPTERS)}")
        return value

    @field_validator("encoder")
    @classmethod
    def _encoder_target(cls, value: str) -> str:
        if value in ("local", "hashing") or value.startswith("grpc://"):
            return value
        raise ValueError("must be 'local', 'hashing' or 'grpc://host:port'")

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_username:
            raise ValueError(
                "SIMSTREAM_KAFKA_SASL_USERNAME (and _PASSWORD) are required with a SASL security protocol"
            )
        return self

    def encoder_options(self, model_base: Path | None = None) -> dict[str, Any]:
        """Keyword arguments of ``encoders.factory.create_encoder`` besides the target."""
        return {
            "model_base": model_base or self.model_base,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "max_length": self.max_length,
            "timeout_s": self.encoder_timeout_s,
            "retries": self.encoder_retries,
        }

    @property
    def state_topics(self) -> tuple[str, str, str]:
        """The internal compacted topics every worker's state is rebuilt from."""
        return (self.topic_products, self.topic_embeddings, self.topic_lexical)

    def list_topic(self, kind: str) -> str:
        """The output topic of a list kind (``serving.kinds``)."""
        return str(getattr(self, spec_of(kind).topic_setting))

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap.split(",") if s.strip()]

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(environment variable, default, description) for every setting, in declaration order."""
        rows = []
        for name, info in cls.model_fields.items():
            default = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
            rows.append((f"SIMSTREAM_{name.upper()}", "" if default is None else str(default), info.description or ""))
        return rows


CONFIGURATION_HEADER = """\
# Configuration

<!-- Generated from `Settings.describe()` in streams/settings.py by `make docs`
     (`simstream settings --markdown`). Do not edit by hand: change the field's description. -->

Every setting is an environment variable with the prefix `SIMSTREAM_`. One frozen settings
object (`streams/settings.py`, pydantic-settings) reads them once at start-up and refuses a
value of the wrong type or outside its range, naming the variable. The core (`serving/`,
`encoders/`) never reads the environment: the worker passes it configuration objects built
from these settings. The worker and every `simstream` command read the same variables
(`simstream --help` lists them too). An empty default means unset.
"""


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _shown_default(default: str) -> str:
    """A default as the table shows it: paths under the home directory start with ``~``."""
    home = str(Path.home())
    if default == home or default.startswith(home + "/"):
        default = "~" + default[len(home):]
    return f"`{default}`" if default else ""


def configuration_markdown() -> str:
    """``docs/configuration.md``: a fixed header and one table row per setting, in declaration order."""
    lines = [CONFIGURATION_HEADER, "| variable | default | description |", "| --- | --- | --- |"]
    for var, default, description in Settings.describe():
        lines.append(f"| `{var}` | {_markdown_cell(_shown_default(default))} | {_markdown_cell(description)} |")
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
