"""Topic provisioning against a real broker: idempotent, and state topics are compacted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from streams.kafka_io import create_topics, describe_cleanup_policy, topic_specs

pytestmark = pytest.mark.integration


def test_create_topics_twice_is_harmless_and_sets_compaction(settings_for: Callable[..., Any]) -> None:
    settings = settings_for()
    first = create_topics(settings)
    assert set(first.values()) == {"created"}
    assert set(first) == {spec.name for spec in topic_specs(settings)}
    assert settings.topic_pair_updates in first  # the internal topic behaviour repartitions through
    # The shared IDF: one partition (one order for every worker), room for a large record.
    from kafka import KafkaConsumer

    from streams.kafka_io import client_options

    consumer = KafkaConsumer(**client_options(settings))
    assert consumer.partitions_for_topic(settings.topic_lexical) == {0}
    assert consumer.partitions_for_topic(settings.topic_models) == {0}  # one order of the learning runs
    assert consumer.partitions_for_topic(settings.topic_competitor_offers) == {0}  # one owner holds every offer
    consumer.close()
    second = create_topics(settings)
    assert set(second.values()) == {"exists"}

    policies = describe_cleanup_policy(settings, list(first))
    compacted = {settings.topic_similar_items, settings.topic_substitutes, settings.topic_complements, settings.topic_duplicates,
                 settings.topic_products, settings.topic_embeddings, settings.topic_lexical,
                 settings.topic_product_labels, settings.topic_models, settings.topic_offer_matches,
                 settings.topic_competitor_prices}
    for spec in topic_specs(settings):
        assert policies[spec.name] == ("compact" if spec.name in compacted else "delete"), spec.name


def test_create_topics_repairs_a_wrong_cleanup_policy(settings_for: Callable[..., Any]) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    from streams.kafka_io import client_options

    settings = settings_for()
    admin = KafkaAdminClient(**client_options(settings))
    admin.create_topics([NewTopic(settings.topic_similar_items, 1, 1, topic_configs={"cleanup.policy": "delete"})])
    admin.close()
    assert create_topics(settings)[settings.topic_similar_items] == "exists"
    assert describe_cleanup_policy(settings, [settings.topic_similar_items]) == {
        settings.topic_similar_items: "compact"}
