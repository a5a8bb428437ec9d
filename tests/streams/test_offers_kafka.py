"""Competitor offers end to end: one worker process with the real encoder (MiniLM, in-process)
on a real broker. Offers on ``competitor-offers`` are matched to own products on
``offer-matches`` (or ``no_match``), ``competitor-prices`` and ``GET /products/{id}/offers``
follow, an own product's title change and its delete re-match the offer, and a malformed
offer is dead-lettered. One worker serves every assertion, to keep the test short."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streams.kafka_io import create_topics, latest_by_key, read_topic
from streams.settings import Settings
from tests.streams.test_web_page import browser  # noqa: F401 (the headless Chromium fixture)
from tests.support import ROOT, WorkerProcess, send, send_products, wait_for

pytestmark = pytest.mark.integration

PRODUCTS = [
    ("SONY", "Sony WH-1000XM4 wireless noise cancelling headphones", "Sony", 348.0),
    ("BOSE", "Bose QuietComfort 45 wireless headphones", "Bose", 279.0),
    ("KEYS", "Logitech MX Keys wireless illuminated keyboard", "Logitech", 99.0),
]


def test_offers_are_matched_re_matched_and_priced(
    model_base: Path, settings_for: Callable[..., Settings], worker_factory: Callable[..., WorkerProcess],
    browser: Any, tmp_path: Path,  # noqa: F811 (the fixture)
) -> None:
    """The page's offers view is checked at the end, on the same worker (the screenshot goes to
    tmp_path, or to docs/offers.png with SIMSTREAM_UPDATE_SCREENSHOTS=1)."""
    settings = settings_for(encoder="local", model_base=str(model_base))
    create_topics(settings)
    worker = worker_factory(SIMSTREAM_ENCODER="local", SIMSTREAM_MODEL_BASE=str(model_base))
    now = time.time()
    send_products(settings, [{"op": "upsert", "product_id": pid, "title": title, "brand": brand, "price": price,
                              "currency": "USD", "ts": now - 60} for pid, title, brand, price in PRODUCTS])
    worker.wait_ready(timeout=180)

    def offers_of(pid: str) -> list[str]:
        status, body = worker.get(f"/products/{pid}/offers")
        return [f"{o['competitor']}|{o['offer_id']}" for o in body["offers"]] if status == 200 else []

    def offer(competitor: str, offer_id: str, title: str, price: float, ts: float) -> tuple[str, bytes]:
        value = {"op": "upsert", "competitor": competitor, "offer_id": offer_id, "title": title, "price": price,
                 "currency": "USD", "url": f"https://{competitor}.example/{offer_id}", "ts": ts}
        return f"{competitor}|{offer_id}", json.dumps(value).encode()

    send(settings, settings.topic_competitor_offers, [
        offer("rival", "1", "Sony WH1000XM4 Wireless Noise Canceling Over-Ear Headphones", 298.0, now - 30),
        offer("rival", "2", "Expandable garden hose 50 ft with brass fittings", 25.0, now - 30),
        offer("other", "7", "Logitech MX Keys Advanced Wireless Illuminated Keyboard", 89.0, now - 30),
        offer("third", "s1", "Sony WH-1000XM4/B wireless industry leading noise canceling headphones", 379.0,
              now - 30),
        ("rival|3", b'{"op": "upsert", "competitor": "rival", "offer_id": "3", "title": "x", "price": -1}'),
        ("rival|4", b"{not json"),
    ])
    wait_for(lambda: sorted(offers_of("SONY")) == ["rival|1", "third|s1"] and offers_of("KEYS") == ["other|7"],
             what="the offers matched", worker=worker)
    status, sony = worker.get("/products/SONY/offers")
    assert status == 200 and sony["price"] == 348.0
    entry = next(o for o in sony["offers"] if o["competitor"] == "rival")
    assert entry["price"] == 298.0 and entry["price_gap"] == {"amount": -50.0, "percent": -14.4, "currency": "USD"}
    assert entry["url"] == "https://rival.example/1" and entry["confidence"] >= sony["threshold"]
    assert worker.get("/products/NOPE/offers")[0] == 404

    # Re-matches: KEYS' offer follows BOSE when BOSE becomes that keyboard (its title, brand and a price
    # like it: a price far off would lower the confidence), and comes back when BOSE goes.
    send_products(settings, [{"op": "upsert", "product_id": "BOSE", "ts": now - 20, "price": 95.0, "brand": "Logitech",
                              "title": "Logitech MX Keys Advanced Wireless Illuminated Keyboard"}])
    wait_for(lambda: offers_of("BOSE") == ["other|7"] and offers_of("KEYS") == [],
             what="the offer re-matched to the retitled product", worker=worker)
    send_products(settings, [{"op": "delete", "product_id": "BOSE", "ts": now - 10}])
    wait_for(lambda: offers_of("KEYS") == ["other|7"], what="the offer re-matched after the delete", worker=worker)

    # The topics hold the same, with increasing versions; the bad offers are dead letters.
    matches: dict[str, Any] = latest_by_key(read_topic(settings, settings.topic_offer_matches))
    assert set(matches) == {"rival|1", "rival|2", "other|7", "third|s1"}
    assert matches["rival|1"]["product_id"] == "SONY" and matches["rival|1"]["no_match"] is False
    hose = matches["rival|2"]
    assert hose["no_match"] is True and hose["product_id"] is None and hose["confidence"] < hose["threshold"]
    assert any(r.startswith("no match: best candidate") for r in hose["reasons"])
    keys = matches["other|7"]
    assert keys["product_id"] == "KEYS" and keys["version"] == 3 and keys["model_version"] == "minilm/1"
    history = [r.value["product_id"] for r in read_topic(settings, settings.topic_offer_matches)
               if r.key == "other|7"]
    assert history == ["KEYS", "BOSE", "KEYS"]
    prices: dict[str, Any] = latest_by_key(read_topic(settings, settings.topic_competitor_prices))
    assert set(prices) == {"SONY", "KEYS"}  # BOSE's list was tombstoned
    assert [o["offer_id"] for o in prices["KEYS"]["offers"]] == ["7"] and prices["KEYS"]["offers"][0]["price"] == 89.0
    dead = [r.value for r in read_topic(settings, settings.topic_dead_letters)
            if r.value and r.value["source_topic"] == settings.topic_competitor_offers]
    assert sorted(d["key"] for d in dead) == ["rival|3", "rival|4"]
    assert any("malformed JSON" in d["error"] for d in dead)
    # Offers never enter the shop's lists.
    status, product = worker.get("/products/SONY")
    assert status == 200 and {i["product_id"] for i in product["similar"]} <= {"KEYS"}

    # The page: a product's competitor offers, with their prices, gaps and confidences.
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(worker.web + "/#SONY")
    WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#offers tr[data-offer]")) == 2)
    cheaper = browser.find_element(By.CSS_SELECTOR, "#offers tr[data-offer='rival|1']")
    assert "298.00 USD" in cheaper.text and "−50.00 USD (−14.4%)" in cheaper.text
    dearer = browser.find_element(By.CSS_SELECTOR, "#offers tr[data-offer='third|s1']")
    assert "+31.00 USD (+8.9%)" in dearer.text
    assert "lowest competitor gap -14.4%" in browser.find_element(By.ID, "offers").text
    out_dir = ROOT / "docs" if os.environ.get("SIMSTREAM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    browser.save_screenshot(str(out_dir / "offers.png"))

    # A restart restores the offers from offer-matches, and republishes nothing that did not change.
    published = len(list(read_topic(settings, settings.topic_offer_matches)))
    worker.stop()
    again = worker_factory(SIMSTREAM_ENCODER="local", SIMSTREAM_MODEL_BASE=str(model_base))
    again.wait_ready(timeout=180)
    wait_for(lambda: again.get("/products/KEYS/offers")[1]["offers"] != [], what="offers restored", worker=again)
    assert [o["offer_id"] for o in again.get("/products/SONY/offers")[1]["offers"]] == \
        [o["offer_id"] for o in sony["offers"]]
    assert "restored 4 competitor offers" in again.log_tail(200)
    assert len(list(read_topic(settings, settings.topic_offer_matches))) == published
