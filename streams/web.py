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

from serving.recommender import Kind
from streams.records import MAX_ID_CHARS, product_to_wire
from streams.wire import item_to_wire

if TYPE_CHECKING:
    import faust

    from streams.app import Runtime

_ID = re.compile(rf"^[^\x00-\x1f\x7f]{{1,{MAX_ID_CHARS}}}$")
PAGE = Path(__file__).parent / "web" / "index.html"
MAX_QUERY_CHARS = 200
MAX_RESULTS = 50
MAX_FEED_ITEMS = 100


def _authorized(runtime: Runtime, request: Request) -> bool:
    token = runtime.settings.web_token
    if token is None:
        return True
    header = request.headers.get("Authorization", "")
    return hmac.compare_digest(header.encode(), f"Bearer {token.get_secret_value()}".encode())


def _snapshot_of_catalog(runtime: Runtime) -> list[Any]:
    """A copy of the catalog's products; the core thread may be inserting while we copy."""
    for _ in range(10):
        try:
            return list(runtime.products.core.catalog)
        except RuntimeError:  # "dictionary changed size during iteration": copy again
            continue
    return []


def register_views(app: faust.App, runtime: Runtime) -> None:
    """Attach every view to ``app``."""

    class Base(View):
        def guard(self, request: Request) -> Response | None:
            if not _authorized(runtime, request):
                return self.json({"error": "missing or wrong bearer token"}, status=401)
            return None

        def bad_id(self, product_id: str) -> Response | None:
            if not _ID.match(product_id):
                return self.json({"error": f"invalid product id (1 to {MAX_ID_CHARS} characters, no control characters)"},
                                 status=400)
            return None

        def unknown(self, product_id: str) -> Response:
            return self.json({"error": f"unknown product {product_id!r}"}, status=404)

    def lists_of(product_id: str) -> dict[str, Any]:
        core = runtime.products.core
        out: dict[str, Any] = {}
        for kind, name in ((Kind.SIMILAR, "similar"), (Kind.SUBSTITUTES, "substitutes")):
            items = core.similar(product_id) if kind is Kind.SIMILAR else core.substitutes(product_id)
            out[name] = [dict(item_to_wire(i), title=_title(i.product_id)) for i in items or ()]
            out[f"{name}_version"] = core.versions.get((kind, product_id), 0)
        return out

    def _title(product_id: str) -> str | None:
        product = runtime.products.core.catalog.get(product_id)
        return product.title if product else None

    @app.page("/health")
    class Health(Base):
        """Readiness: 200 once the catalog is restored and the encoder answered; 503 before."""

        async def get(self, request: Request) -> Response:
            ready = runtime.ready.is_set()
            stats = runtime.products.core.stats()
            healthy = ready and runtime.encoder_ok and not runtime.products.pending
            body = {
                "status": "ok" if healthy else ("degraded" if ready else "starting"),
                "catalog_loaded": ready,
                "encoder_reachable": runtime.encoder_ok,
                "pending_text_changes": len(runtime.products.pending),
                "model_version": runtime.products.encoder.model_version if runtime.encoder_ok and runtime.products.encoder else None,
                "products": stats.products,
                "index_live": stats.index_live,
                "index_deleted": stats.index_deleted,
                "stale_events": stats.stale_events,
                "restored_from": runtime.restored_from,
                "uptime_s": round(time.time() - runtime.started_at, 1),
                # A refused model version (the old one stays live) and the rollover's progress.
                **(runtime.rollover.health() if runtime.rollover is not None else {}),
                # Scale-out: owned partitions, handovers, replica lag (streams/scaleout.py).
                **(runtime.ownership.health() if runtime.ownership is not None else {}),
                **(runtime.replica.health() if runtime.replica is not None else {}),
            }
            return self.json(body, status=200 if healthy else 503)

    @app.page("/metrics")
    class Metrics(Base):
        async def get(self, request: Request) -> Response:
            if (denied := self.guard(request)) is not None:
                return denied
            return self.bytes(runtime.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/products/{product_id}")
    class ProductView(Base):
        async def get(self, request: Request, product_id: str) -> Response:
            if (denied := self.guard(request) or self.bad_id(product_id)) is not None:
                return denied
            product = runtime.products.core.catalog.get(product_id)
            if product is None:
                return self.unknown(product_id)
            return self.json({**product_to_wire(product), **lists_of(product_id)})

    def list_view(kind: Kind, path: str) -> None:
        @app.page(path)
        class ListView(Base):
            async def get(self, request: Request, product_id: str) -> Response:
                if (denied := self.guard(request) or self.bad_id(product_id)) is not None:
                    return denied
                if product_id not in runtime.products.core.catalog:
                    return self.unknown(product_id)
                core = runtime.products.core
                items = core.similar(product_id) if kind is Kind.SIMILAR else core.substitutes(product_id)
                return self.json({
                    "product_id": product_id,
                    "items": [item_to_wire(i) for i in items or ()],
                    "version": core.versions.get((kind, product_id), 0),
                    "model_version": runtime.products.model_version,
                })

    list_view(Kind.SIMILAR, "/similar/{product_id}")
    list_view(Kind.SUBSTITUTES, "/substitutes/{product_id}")

    @app.page("/complements/{product_id}")
    class Complements(Base):
        async def get(self, request: Request, product_id: str) -> Response:
            if (denied := self.guard(request) or self.bad_id(product_id)) is not None:
                return denied
            core = runtime.products.core
            if product_id not in core.catalog:
                return self.unknown(product_id)
            return self.json({"product_id": product_id,
                              "items": [item_to_wire(i) for i in core.complements(product_id) or ()],
                              "version": core.versions.get((Kind.COMPLEMENTS, product_id), 0)})

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
            raw_k = request.query.get("k", str(runtime.settings.feed_k))
            if not raw_k.isdigit() or not 1 <= int(raw_k) <= MAX_FEED_ITEMS:
                return self.json({"error": f"k must be an integer from 1 to {MAX_FEED_ITEMS}"}, status=400)
            category = request.query.get("category") or None
            if category is not None and len(category) > MAX_QUERY_CHARS:
                return self.json({"error": f"category is limited to {MAX_QUERY_CHARS} characters"}, status=400)
            items = runtime.users.recommend(user_id, k=int(raw_k), category=category)
            return self.json({"user_id": user_id,
                              "items": [{"product_id": i.product_id, "score": i.score, "because": list(i.because)}
                                        for i in items],
                              "history": len(runtime.users.feeds.history(user_id, time.time()))})

    @app.page("/search")
    class Search(Base):
        """Products whose title contains every word of ``q`` (case-insensitive)."""

        async def get(self, request: Request) -> Response:
            if (denied := self.guard(request)) is not None:
                return denied
            query = request.query.get("q", "")
            if len(query) > MAX_QUERY_CHARS:
                return self.json({"error": f"q is limited to {MAX_QUERY_CHARS} characters"}, status=400)
            raw_limit = request.query.get("limit", "20")
            # Bounded like every list parameter: out of range is a clear 400, not a silent clamp.
            if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_RESULTS:
                return self.json({"error": f"limit must be an integer from 1 to {MAX_RESULTS}"}, status=400)
            limit = int(raw_limit)
            words = query.lower().split()
            hits = []
            for product in _snapshot_of_catalog(runtime):
                title = product.title.lower()
                if all(w in title for w in words):
                    hits.append({"product_id": product.product_id, "title": product.title, "brand": product.brand,
                                 "price": product.price, "in_stock": product.in_stock})
                    if len(hits) >= limit:
                        break
            return self.json({"query": query, "results": hits})

    @app.page("/stats")
    class Stats(Base):
        """Live counters for the page."""

        async def get(self, request: Request) -> Response:
            if (denied := self.guard(request)) is not None:
                return denied
            stats = runtime.products.core.stats()
            registry = runtime.metrics.registry
            def total(name: str) -> float:
                return sum(s.value for m in registry.collect() if m.name == name for s in m.samples
                           if s.name.endswith("_total"))
            return self.json({
                "products": stats.products, "index_live": stats.index_live, "index_deleted": stats.index_deleted,
                "stale_events": stats.stale_events, "lists": stats.lists, "publications": stats.publications,
                "events": total("simstream_events"), "dead_letters": total("simstream_dead_letters"),
                "published_records": total("simstream_published"), "embedded_texts": runtime.products.embedded_texts,
                "model_version": runtime.products.model_version if runtime.encoder_ok else None,
                "last_event_at": runtime.last_event_at,
                **(runtime.rollover.health() if runtime.rollover is not None else {}),
                # Scale-out: owned partitions, handovers, replica lag (streams/scaleout.py).
                **(runtime.ownership.health() if runtime.ownership is not None else {}),
                **(runtime.replica.health() if runtime.replica is not None else {}),
            })

    @app.page("/debug/lexical")
    class Lexical(Base):
        """The frozen IDF in use (base64 float32), so an audit can recompute lists exactly."""

        async def get(self, request: Request) -> Response:
            if (denied := self.guard(request)) is not None:
                return denied
            model = runtime.products.core.lexical
            idf = None if model.idf is None else base64.b64encode(np.asarray(model.idf, "<f4").tobytes()).decode()
            return self.json({"n_docs": model.n_docs, "idf": idf})

    def admin_view(path: str, action: str) -> None:
        @app.page(path)
        class Admin(Base):
            """Operations (token-guarded like the read API): run one worker action, answer its result."""

            async def post(self, request: Request) -> Response:
                if (denied := self.guard(request)) is not None:
                    return denied
                if not runtime.ready.is_set():
                    return self.json({"error": "the worker is still starting"}, status=503)
                try:
                    return self.json(await runtime.actions[action]())
                except Exception as exc:  # noqa: BLE001 - report, keep serving
                    return self.json({"error": f"{action} failed: {exc}"}, status=500)

    admin_view("/admin/snapshot", "snapshot")
    admin_view("/admin/rebuild-index", "rebuild-index")

    @app.page("/")
    class Page(Base):
        async def get(self, request: Request) -> Response:
            return self.html(PAGE.read_text(encoding="utf-8"))
