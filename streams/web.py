"""The read API and the page, served by the worker's Faust web server (aiohttp).

Every endpoint but ``/health`` requires ``Authorization: Bearer <SIMSTREAM_WEB_TOKEN>`` when
that setting is set. Ids in paths are validated (length, no control characters) and unknown
ids answer 404 with a JSON error.
"""

from __future__ import annotations

import base64
import hmac
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from faust.web import Request, Response, View

from serving.recommender import CONTENT_KINDS, Kind, Recommender
from serving.search import InvalidSearch, parse_search_params
from streams.records import MAX_ID_CHARS, product_to_wire
from streams.search import QueryVectors, SearchUnavailable, run_search
from streams.wire import item_to_wire, items_to_wire

if TYPE_CHECKING:
    import faust

    from streams.worker import Worker

_ID = re.compile(rf"^[^\x00-\x1f\x7f]{{1,{MAX_ID_CHARS}}}$")
PAGE = Path(__file__).parent / "web" / "index.html"
MAX_QUERY_CHARS = 200
MAX_FEED_ITEMS = 100


def authorized(worker: Worker, request: Request) -> bool:
    """Whether ``request`` carries the bearer token (always, when none is configured)."""
    token = worker.settings.web_token
    if token is None:
        return True
    header = request.headers.get("Authorization", "")
    return hmac.compare_digest(header.encode(), f"Bearer {token.get_secret_value()}".encode())


def register_views(app: faust.App, worker: Worker) -> None:
    """Attach every view to ``app``. Views read the core through ``Engine.read`` (on the core's
    thread, between two writes), so a read never sees a change half applied."""
    from streams.offers import register_offer_views
    from streams.rollover import register_rollover_views

    engine = worker.engine
    register_rollover_views(app, worker.rollover, lambda request: authorized(worker, request))
    register_offer_views(app, worker.offers, lambda request: authorized(worker, request),
                         lambda product_id: bool(_ID.match(product_id)))

    class Base(View):
        def guard(self, request: Request) -> Response | None:
            if not authorized(worker, request):
                return self.json({"error": "missing or wrong bearer token"}, status=401)
            return None

        def bad_id(self, product_id: str) -> Response | None:
            if not _ID.match(product_id):
                return self.json({"error": f"invalid product id (1 to {MAX_ID_CHARS} characters, no control characters)"},
                                 status=400)
            return None

        def unknown(self, product_id: str) -> Response:
            return self.json({"error": f"unknown product {product_id!r}"}, status=404)

    def lists_of(core: Recommender, product_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in CONTENT_KINDS:
            name = str(kind)
            out[name] = [dict(item_to_wire(i), title=title(core, i.product_id)) for i in core.list_of(kind, product_id) or ()]
            out[f"{name}_version"] = core.versions.get((kind, product_id), 0)
        return out

    def title(core: Recommender, product_id: str) -> str | None:
        product = core.catalog.get(product_id)
        return product.title if product else None

    @app.page("/health")
    class Health(Base):
        """Readiness: 200 once the catalog is restored, the input seen at start is consumed and the
        encoder answered; 503 before (``status`` says which: starting, catching_up, degraded)."""

        async def get(self, request: Request) -> Response:
            health = worker.health()
            return self.json(health.body, status=200 if health.ok else 503)

    @app.page("/metrics")
    class Metrics(Base):
        async def get(self, request: Request) -> Response:
            if (denied := self.guard(request)) is not None:
                return denied
            return self.bytes(worker.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/products/{product_id}")
    class ProductView(Base):
        async def get(self, request: Request, product_id: str) -> Response:
            if (denied := self.guard(request) or self.bad_id(product_id)) is not None:
                return denied
            body = await engine.read(lambda core: None if (p := core.catalog.get(product_id)) is None
                                     else {**product_to_wire(p), **lists_of(core, product_id)})
            if body is None:
                return self.unknown(product_id)
            return self.json(body)

    def list_view(kind: Kind, path: str) -> None:
        @app.page(path)
        class ListView(Base):
            async def get(self, request: Request, product_id: str) -> Response:
                if (denied := self.guard(request) or self.bad_id(product_id)) is not None:
                    return denied
                body = await engine.read(lambda core: None if product_id not in core.catalog else {
                    "product_id": product_id,
                    "items": items_to_wire(core.list_of(kind, product_id) or ()),
                    "version": core.versions.get((kind, product_id), 0),
                    "model_version": engine.model_version,
                })
                if body is None:
                    return self.unknown(product_id)
                return self.json(body)

    for kind in Kind:  # one read endpoint per registered list kind: /similar/{id}, /substitutes/{id}, ...
        list_view(kind, f"/{kind}/{{product_id}}")

    @app.page("/products/{product_id}/duplicates")
    class DuplicatesView(Base):
        """The other listings of the same product (the ``duplicates`` topic's list), with titles."""

        async def get(self, request: Request, product_id: str) -> Response:
            if (denied := self.guard(request) or self.bad_id(product_id)) is not None:
                return denied
            body = await engine.read(lambda core: None if product_id not in core.catalog
                                     else duplicates_of(core, product_id))
            if body is None:
                return self.unknown(product_id)
            return self.json(body)

    def duplicates_of(core: Recommender, product_id: str) -> dict[str, Any]:
        items = core.duplicates(product_id)
        return {"product_id": product_id, "title": title(core, product_id),
                "owned": items is not None, "threshold": core.config.duplicate_threshold,
                "version": core.versions.get((Kind.DUPLICATES, product_id), 0),
                "model_version": engine.model_version,
                "duplicates": [{"duplicate_id": i.product_id, "title": title(core, i.product_id), "score": i.score,
                                "dense": i.dense, "lexical": i.lexical, "reasons": list(i.reasons)}
                               for i in items or ()]}

    @app.page("/live")
    class Live(Base):
        """The live stream (``streams.live``): the last changes and the lists each republished,
        freshness p50/p99 over the last minutes, counters, and the model versions in use."""

        async def get(self, request: Request) -> Response:
            if (denied := self.guard(request)) is not None:
                return denied
            body = worker.live.as_json()
            ids = {c["product_id"] for c in body["changes"] if c["product_id"]}
            ids |= {item["product_id"] for c in body["changes"] for item in c["lists"]}
            titles = await engine.read(lambda core: {pid: title(core, pid) for pid in ids})
            for change in body["changes"]:
                change["title"] = titles.get(change["product_id"]) if change["product_id"] else None
                for item in change["lists"]:
                    item["title"] = titles.get(item["product_id"])
            lexical = engine.core.lexical
            body["models"] = {"encoder": engine.model_version if engine.encoder_ok else None,
                              "rollover": worker.rollover.status.as_json(),
                              "lexical_idf_docs": lexical.n_docs if lexical.fitted else None,
                              "duplicate_threshold": engine.core.config.duplicate_threshold}
            return self.json(body)

    @app.page("/users/{user_id}/recommendations")
    class UserRecommendations(Base):
        """The user's feed now; ``k`` (1 to ``MAX_FEED_ITEMS``) items; trending for new users,
        within ``category`` (a leaf category) when the caller knows one."""

        async def get(self, request: Request, user_id: str) -> Response:
            if (denied := self.guard(request)) is not None:
                return denied
            if not _ID.match(user_id):
                return self.json({"error": f"invalid user id (1 to {MAX_ID_CHARS} characters, no control characters)"},
                                 status=400)
            raw_k = request.query.get("k", str(worker.settings.feed_k))
            if not raw_k.isdigit() or not 1 <= int(raw_k) <= MAX_FEED_ITEMS:
                return self.json({"error": f"k must be an integer from 1 to {MAX_FEED_ITEMS}"}, status=400)
            category = request.query.get("category") or None
            if category is not None and len(category) > MAX_QUERY_CHARS:
                return self.json({"error": f"category is limited to {MAX_QUERY_CHARS} characters"}, status=400)
            # On the event loop, like every change to the shoppers' state; of the core it reads
            # single lists and products by id, each an atomic lookup of an immutable value.
            users = worker.users
            items = users.recommend(user_id, k=int(raw_k), category=category)
            return self.json({"user_id": user_id,
                              "items": [{"product_id": i.product_id, "score": i.score, "because": list(i.because)}
                                        for i in items],
                              "history": len(users.feeds.history(user_id, time.time()))})

    queries = QueryVectors(worker.settings.search_cache_size)

    @app.page("/search")
    class Search(Base):
        """Semantic search (``serving.search``): ``q``, ``k`` (1 to 50), and the filters ``category``,
        ``in_stock``, ``price_min``, ``price_max``; hits with their scores and reasons."""

        async def get(self, request: Request) -> Response:
            if (denied := self.guard(request)) is not None:
                return denied
            try:
                search_request = parse_search_params(request.query)
                return self.json(await run_search(engine, queries, search_request))
            except InvalidSearch as exc:
                return self.json({"error": str(exc)}, status=400)
            except SearchUnavailable as exc:
                return self.json({"error": str(exc)}, status=503)

    @app.page("/stats")
    class Stats(Base):
        """Live counters for the page."""

        async def get(self, request: Request) -> Response:
            if (denied := self.guard(request)) is not None:
                return denied
            stats = await engine.read(lambda core: core.stats())
            registry = worker.metrics.registry
            def total(name: str) -> float:
                return sum(s.value for m in registry.collect() if m.name == name for s in m.samples
                           if s.name.endswith("_total"))
            return self.json({
                "products": stats.products, "index_live": stats.index_live, "index_deleted": stats.index_deleted,
                "stale_events": stats.stale_events, "lists": stats.lists, "publications": stats.publications,
                "events": total("simstream_events"), "dead_letters": total("simstream_dead_letters"),
                "published_records": total("simstream_published"), "embedded_texts": engine.embedded_texts,
                "model_version": engine.model_version if engine.encoder_ok else None,
                "last_event_at": worker.last_event_at,
                "search_cache": {"size": len(queries), "hits": queries.hits, "misses": queries.misses},
                # The rollover, and scale-out: owned partitions, handovers, replica lag.
                **worker.status_parts(),
            })

    @app.page("/debug/lexical")
    class Lexical(Base):
        """The frozen IDF in use (base64 float32), so an audit can recompute lists exactly."""

        async def get(self, request: Request) -> Response:
            if (denied := self.guard(request)) is not None:
                return denied
            model = engine.core.lexical
            idf = None if model.idf is None else base64.b64encode(np.asarray(model.idf, "<f4").tobytes()).decode()
            return self.json({"scheme": model.scheme, "n_docs": model.n_docs, "idf": idf})

    def admin_view(path: str, action: str) -> None:
        @app.page(path)
        class Admin(Base):
            """Operations (token-guarded like the read API): run one worker action, answer its result."""

            async def post(self, request: Request) -> Response:
                if (denied := self.guard(request)) is not None:
                    return denied
                if not worker.ready.is_set():
                    return self.json({"error": "the worker is still starting"}, status=503)
                try:
                    return self.json(await worker.actions[action]())
                except Exception as exc:  # noqa: BLE001 - report, keep serving
                    return self.json({"error": f"{action} failed: {exc}"}, status=500)

    admin_view("/admin/snapshot", "snapshot")
    admin_view("/admin/rebuild-index", "rebuild-index")
    admin_view("/admin/learn", "learn")

    @app.page("/")
    class Page(Base):
        async def get(self, request: Request) -> Response:
            return self.html(PAGE.read_text(encoding="utf-8"))
