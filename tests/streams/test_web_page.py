"""The page at ``/``, driven in headless Chromium against a live worker on a real broker."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from streams.kafka_io import create_topics, producer
from streams.settings import Settings
from tests.support import ROOT, WorkerProcess

pytestmark = pytest.mark.integration

PRODUCTS = [
    ("H1", "Sony WH-1000XM4 wireless noise cancelling headphones", "Sony", 278.0),
    ("H2", "Sony WH-1000XM5 wireless noise cancelling headphones", "Sony", 299.0),
    ("H3", "Bose QuietComfort 45 wireless noise cancelling headphones", "Bose", 289.0),
    ("K1", "Logitech MX Keys wireless keyboard", "Logitech", 99.0),
]


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "install Debian's chromium and chromium-driver (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    driver.set_window_size(1280, 900)
    yield driver
    driver.quit()


def test_search_pick_and_see_lists_with_scores_and_reasons(
    settings_for: Callable[..., Settings], worker_factory: Callable[..., WorkerProcess], browser: Any,
    tmp_path: Any,
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    screenshot_dir = tmp_path
    settings = settings_for()
    create_topics(settings)
    worker = worker_factory()
    worker.wait_ready()
    kafka = producer(settings)
    for pid, title, brand, price in PRODUCTS:
        event = {"op": "upsert", "product_id": pid, "title": title, "brand": brand, "price": price,
                 "category": ["Electronics", "Audio" if pid[0] == "H" else "Keyboards"], "ts": time.time() - 5}
        kafka.send(settings.topic_product_changes, key=pid.encode(), value=json.dumps(event).encode())
    kafka.flush()
    kafka.close()
    deadline = time.monotonic() + 60
    while worker.get("/stats")[1]["products"] < len(PRODUCTS) and time.monotonic() < deadline:
        time.sleep(0.3)

    # The page re-renders its lists while a condition reads them: a stale element means "not yet".
    wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(worker.web + "/")
    wait.until(lambda d: "products: 4" in d.find_element(By.ID, "counters").text)

    browser.find_element(By.ID, "q").send_keys("wh-1000xm4")
    hit = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#results li[data-product='H1']")))
    assert "Sony WH-1000XM4" in hit.text
    hit.click()

    similar = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#similar tr[data-item]")))
    rows = browser.find_elements(By.CSS_SELECTOR, "#similar tr[data-item]")
    assert rows[0].get_attribute("data-item") == "H2"
    assert float(similar.find_elements(By.TAG_NAME, "td")[1].text) > 0
    assert "same brand" in rows[0].text
    substitutes = browser.find_elements(By.CSS_SELECTOR, "#substitutes tr[data-item]")
    assert {r.get_attribute("data-item") for r in substitutes} == {"H2", "H3"}  # same category, in the band
    assert "in stock" in browser.find_element(By.ID, "product").text

    # Live: the product goes out of stock, and the page shows it on the next visit.
    kafka = producer(settings)
    kafka.send(settings.topic_product_changes, key=b"H1", value=json.dumps(
        {"op": "upsert", "product_id": "H1", "in_stock": False, "ts": time.time()}).encode())
    kafka.flush()
    kafka.close()
    deadline = time.monotonic() + 30
    while worker.get("/products/H1")[1]["in_stock"] and time.monotonic() < deadline:
        time.sleep(0.3)
    browser.refresh()
    wait.until(lambda d: "out of stock" in d.find_element(By.ID, "product").text)
    browser.save_screenshot(str(screenshot_dir / "page.png"))


SEARCH_PRODUCTS = [
    ("SONY", "Sony WH-1000XM4 wireless noise cancelling headphones", "Sony", ["Electronics", "Audio", "Headphones"],
     348.0, True),
    ("BOSE", "Bose QuietComfort 45 wireless headphones", "Bose", ["Electronics", "Audio", "Headphones"], 279.0, False),
    ("JBL", "JBL Tune 510BT on-ear bluetooth headphones", "JBL", ["Electronics", "Audio", "Headphones"], 39.0, True),
    ("EARB", "Apple AirPods Pro in-ear earbuds with noise cancellation", "Apple", ["Electronics", "Audio", "Earbuds"],
     249.0, True),
    ("SPK", "JBL Flip 6 portable waterproof speaker", "JBL", ["Electronics", "Audio", "Speakers"], 99.0, True),
    ("KEYS", "Logitech MX Keys wireless keyboard", "Logitech", ["Electronics", "Computers", "Keyboards"], 99.0, True),
    ("POT", "Instant Pot Duo 7-in-1 electric pressure cooker", "Instant Pot", ["Home", "Kitchen"], 89.0, True),
]


def test_the_search_box_uses_semantic_search_with_filters_and_reasons(
    settings_for: Callable[..., Settings], worker_factory: Callable[..., WorkerProcess], browser: Any,
    model_base: Any, tmp_path: Any,
) -> None:
    """The real encoder: a query by meaning, the filters, the reasons on each hit, an error line.

    The screenshot of the search view goes to tmp_path, or to docs/search.png with
    SIMSTREAM_UPDATE_SCREENSHOTS=1 (how docs/search.png is made).
    """
    import os

    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    settings = settings_for()
    create_topics(settings)
    worker = worker_factory(SIMSTREAM_ENCODER="local", SIMSTREAM_MODEL_BASE=str(model_base))
    worker.wait_ready(timeout=180)
    kafka = producer(settings)
    for pid, title, brand, category, price, in_stock in SEARCH_PRODUCTS:
        event = {"op": "upsert", "product_id": pid, "title": title, "brand": brand, "price": price,
                 "currency": "USD", "category": category, "in_stock": in_stock, "ts": time.time() - 5}
        kafka.send(settings.topic_product_changes, key=pid.encode(), value=json.dumps(event).encode())
    kafka.flush()
    kafka.close()
    deadline = time.monotonic() + 60
    while worker.get("/stats")[1]["index_live"] < len(SEARCH_PRODUCTS) and time.monotonic() < deadline:
        time.sleep(0.3)

    # The page re-renders its lists while a condition reads them: a stale element means "not yet".
    wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(worker.web + "/")

    def shown() -> list[str]:
        # One script call reads the whole list at once: element handles go stale when it re-renders.
        return list(browser.execute_script(
            "return Array.from(document.querySelectorAll('#results li'), li => li.dataset.product || '')"))

    # By meaning: no word of the query is in the products' texts.
    browser.find_element(By.ID, "q").send_keys("something to listen to music on a long flight")
    wait.until(lambda d: len(shown()) == len(SEARCH_PRODUCTS))
    assert set(shown()[:5]) == {"SONY", "BOSE", "JBL", "EARB", "SPK"}  # everything to listen with first
    first = browser.find_element(By.CSS_SELECTOR, "#results li")
    assert "dense" in first.text and "score " in first.text

    # Filters: a category at any level, in stock only, a price ceiling.
    browser.find_element(By.ID, "category").send_keys("headphones")
    wait.until(lambda d: set(shown()) == {"SONY", "BOSE", "JBL"})
    browser.find_element(By.ID, "in_stock").click()
    wait.until(lambda d: set(shown()) == {"SONY", "JBL"})
    browser.find_element(By.ID, "price_max").send_keys("400")
    wait.until(lambda d: "price 348 in [0, 400]" in d.find_element(By.CSS_SELECTOR, "#results li[data-product='SONY']").text)
    hit = browser.find_element(By.CSS_SELECTOR, "#results li[data-product='SONY']")
    for reason in ("category: Headphones", "in stock"):
        assert reason in hit.text
    assert "2 hits" in browser.find_element(By.ID, "search-status").text
    out_dir = ROOT / "docs" if os.environ.get("SIMSTREAM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    browser.save_screenshot(str(out_dir / "search.png"))

    # A pick shows the product's lists, as before.
    hit.click()
    wait.until(lambda d: "Sony WH-1000XM4" in d.find_element(By.ID, "product").text)

    # A bad filter: the one-line error, no hits.
    browser.find_element(By.ID, "price_max").clear()
    browser.find_element(By.ID, "price_max").send_keys("-5")
    wait.until(lambda d: "price_max must be a number of at least 0" in d.find_element(By.ID, "search-status").text)
    assert shown() == []


DUPLICATE_PRODUCTS = [
    ("STUFF-1", "Stuffit Deluxe 11", "Smith Micro", ["Software", "Utilities"], 79.99),
    ("STUFF-2", "stuffit  deluxe 11", "smith micro", ["Software", "Utilities"], 74.99),  # the same, typed again
    ("PSE-1", "Adobe Photoshop Elements 2.0 for Windows", "Adobe", ["Software", "Graphics"], 99.0),
    ("PSE-2", "Photoshop Elements 2.0 (Windows)", "Adobe", ["Software", "Graphics"], 89.0),
    ("POSER", "Poser 8 3D figure animation", "Smith Micro", ["Software", "Graphics"], 199.0),
    ("KEYS", "Logitech MX Keys wireless keyboard", "Logitech", ["Electronics", "Keyboards"], 99.0),
]


def test_the_live_stream_and_a_products_duplicates(
    settings_for: Callable[..., Settings], worker_factory: Callable[..., WorkerProcess], browser: Any,
    tmp_path: Any,
) -> None:
    """The landing view is the live stream (changes, what each republished, freshness,
    counters, models); a product shows its duplicate listings. Screenshots go to tmp_path, or
    to docs/live.png and docs/duplicates.png with SIMSTREAM_UPDATE_SCREENSHOTS=1."""
    import os

    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    settings = settings_for()
    create_topics(settings)
    worker = worker_factory()
    worker.wait_ready()
    kafka = producer(settings)
    for pid, title, brand, category, price in DUPLICATE_PRODUCTS:
        event = {"op": "upsert", "product_id": pid, "title": title, "brand": brand, "category": category,
                 "price": price, "currency": "USD", "ts": time.time()}
        kafka.send(settings.topic_product_changes, key=pid.encode(), value=json.dumps(event).encode())
    kafka.flush()
    # One more change after the catalog: a price cut, which republishes the lists it moves.
    kafka.send(settings.topic_product_changes, key=b"STUFF-2", value=json.dumps(
        {"op": "upsert", "product_id": "STUFF-2", "price": 69.99, "ts": time.time()}).encode())
    kafka.flush()
    kafka.close()
    deadline = time.monotonic() + 60
    while worker.get("/products/STUFF-2")[1].get("price") != 69.99 and time.monotonic() < deadline:
        time.sleep(0.3)

    out_dir = ROOT / "docs" if os.environ.get("SIMSTREAM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    browser.set_window_size(1280, 1000)
    # The page re-renders its lists while a condition reads them: a stale element means "not yet".
    wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(worker.web + "/")
    wait.until(lambda d: any("duplicates Stuffit Deluxe 11" in r.text
                             for r in d.find_elements(By.CSS_SELECTOR, "#live tr[data-change]")))
    live = browser.find_element(By.ID, "live")
    assert "freshness p50" in live.text and "p99" in live.text and "encoder hashing" in live.text
    assert "duplicate threshold" in live.text
    browser.save_screenshot(str(out_dir / "live.png"))

    # Pick a product from the stream: its page, lists and duplicate listings.
    first = browser.find_element(By.CSS_SELECTOR, "#live tr[data-change] a")
    picked = first.text
    first.click()
    wait.until(lambda d: picked in d.find_element(By.ID, "product").text)
    assert browser.find_elements(By.ID, "duplicates")
    for pid, other, reason in (("PSE-1", "PSE-2", "content score >="), ("STUFF-1", "STUFF-2", "same brand and title words")):
        browser.get(f"{worker.web}/#{pid}")
        browser.refresh()
        wait.until(lambda d, other=other: [r.get_attribute("data-item") for r in
                                           d.find_elements(By.CSS_SELECTOR, "#duplicates tr[data-item]")] == [other])
        assert reason in browser.find_element(By.ID, "duplicates").text
    browser.set_window_size(1280, 1300)
    browser.save_screenshot(str(out_dir / "duplicates.png"))
    # And back to the stream.
    browser.find_element(By.ID, "nav-live").click()
    wait.until(lambda d: len(d.find_elements(By.ID, "live")) == 1)
