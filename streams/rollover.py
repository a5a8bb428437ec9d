"""Live model rollover: move the worker from encoder version N to M with zero downtime.

Triggers (see the README, "Model rollover"):

* ``POST /admin/model-version`` with ``{"version": M}``: an explicit version for this process
  (it also stops following the latest until the worker restarts; make it permanent with
  ``SIMSTREAM_MODEL_VERSION``);
* with ``SIMSTREAM_MODEL_VERSION`` unset, every ``SIMSTREAM_MODEL_POLL_INTERVAL_S`` the worker
  asks for the versions on offer (TF Serving's ``ModelService.GetModelStatus`` for
  ``grpc://``, the folders under ``SIMSTREAM_MODEL_BASE`` for ``local``) and rolls over to the
  newest one.

What happens:

1. **Verify.** An encoder pinned to M is built and checked (``encoders.verify``: signature and
   dimension of the SavedModel folder when the worker can see it, then a probe through the
   adapter). A refused version leaves N live; the reason is one log line and ``model_error``
   on ``/health``. Start-up goes through the same check (``start_live_encoder``): a refused
   version falls back to the version that was live before (``<data_dir>/model.json``), or,
   when following the latest, to the newest older version that passes.
2. **Re-embed** the catalog as it was when the rollover began, in batches of
   ``SIMSTREAM_ROLLOVER_BATCH_SIZE`` (progress: ``simstream_rollover_progress``, ``/health``,
   ``/stats``). The live engine keeps applying and publishing with N meanwhile, and
   journals every change it applies (``Engine.journal``).
3. **Build** a new ``Recommender`` (new index, same frozen IDF, same ownership and
   behaviour rows) from the M vectors, in a second engine on a thread of its own: the live
   core's thread stays free.
4. **Catch up**: replay the journal onto the new core through that engine's ``apply``,
   embedding with M, until only a few changes are left; then, under the batch lock (between
   two batches), replay the rest, copy the behaviour rows and the list version counters,
   and ``Engine.swap`` the live engine to the new core and encoder (one assignment on the
   event loop). Reads answer from N until that instant and from M after it.
5. **Republish**, in chunks each under the batch lock (so a live batch never interleaves
   inside a chunk and nothing older overwrites a newer list): every list with
   ``model_version`` M, then every ``simstream-embeddings`` record with M, so a restart
   restores M's vectors.

Vectors of N and M never meet: the old core only ever gets N vectors (its encoder is pinned
to N), the new one only M vectors (its own encoder, pinned to M), and each list is built
inside one core.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from encoders.base import EMBEDDING_DIM, Encoder
from encoders.export import list_versions, version_blend
from encoders.factory import create_encoder
from encoders.verify import probe_encoder, verify_model
from serving.catalog import ProductChange
from serving.config import Blend
from serving.errors import ConfigurationError, EncoderError, EncoderUnavailable, ModelMismatch, SimstreamError
from serving.recommender import CONTENT_KINDS, BehaviorRow, Kind, Recommender
from serving.text import product_text
from streams.engine import Change, Engine
from streams.metrics import Metrics
from streams.outputs import Outbound, Send
from streams.settings import Settings
from streams.wire import StoredEmbedding, embedding_to_wire

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

MARKER = "model.json"
#: Lists (or embedding records) republished per hold of the batch lock after the swap.
REPUBLISH_CHUNK = 500


def blend_for(settings: Settings, version: int | None) -> Blend:
    """The blend the lists of model ``version`` use: the one it carries (fitted by ``simstream
    learn``) when ``SIMSTREAM_MODEL_BLEND`` is on and its folder is readable here, else the settings'."""
    carried = version_blend(settings.model_base, version) if settings.model_blend and version is not None else None
    return carried or Blend(settings.lexical_weight, settings.lexical_floor, settings.behavior_weight)


class RolloverBusy(SimstreamError):  # noqa: N818 (public name)
    """A rollover is already running; wait for it (``/health``) and ask again."""


class RolloverAborted(SimstreamError):  # noqa: N818 (public name)
    """The rollover stopped before the swap; the old version stays live."""


def version_number(label: str) -> int | None:
    """``minilm/2`` -> 2 (``None`` when the label carries no integer version)."""
    tail = label.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass
class RolloverStatus:
    """What ``/health`` and ``/stats`` show under ``rollover``."""

    phase: str = "idle"  # idle, embedding, building, catching-up, republishing, done, failed
    from_version: str | None = None
    to_version: str | None = None
    total: int = 0  # texts to re-embed
    embedded: int = 0
    caught_up: int = 0  # journaled changes replayed onto the new core
    republished: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None

    @property
    def progress(self) -> float:
        return 1.0 if self.total == 0 else round(self.embedded / self.total, 4)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "progress": self.progress}


class ModelRollover:
    """Chooses the live model version and rolls the worker over to another one."""

    def __init__(self, settings: Settings, metrics: Metrics, engine: Engine, batch_lock: asyncio.Lock,
                 ready: asyncio.Event, publish: Send,
                 on_swap: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine = engine
        self.batch_lock = batch_lock
        self.ready = ready
        self.publish = publish
        #: Called right after a swap (the worker marks its state for the next snapshot).
        self.on_swap = on_swap
        self.status = RolloverStatus()
        #: Last refusal or failure, one line (``model_error`` on ``/health``); cleared by a swap.
        self.error: str | None = None
        #: Versions refused, so the poll does not try them again and again.
        self.refused: dict[int, str] = {}
        #: A version asked for on the admin endpoint: the poll stops following the latest.
        self.override: int | None = None
        self.live: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_poll = 0.0

    # ------------------------------------------------------------------ versions

    @property
    def versioned(self) -> bool:
        """Whether the encoder has model versions at all (the hashing twin has none)."""
        return self.settings.encoder != "hashing"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def make_encoder(self, version: int) -> Encoder:
        return create_encoder(self.settings.encoder, **{**self.settings.encoder_options(), "model_version": version})

    async def available_versions(self) -> list[int]:
        """Versions on offer: TF Serving's AVAILABLE ones, or the folders under the model base."""
        if self.settings.encoder.startswith("grpc://"):
            encoder = self.engine.encoder
            if encoder is None or not hasattr(encoder, "available_versions"):
                encoder = self.make_encoder(1)
            return list(await encoder.available_versions())  # type: ignore[attr-defined]
        return await asyncio.to_thread(list_versions, self.settings.model_base.expanduser())

    async def verify(self, version: int) -> Encoder:
        """A started encoder pinned to ``version``; ``ModelMismatch`` when the version is refused."""
        version_dir = self.settings.model_base.expanduser() / str(version)
        if self.settings.encoder == "local" or version_dir.is_dir():
            # The folder's signature, dimension and metadata; the probe below runs the model.
            await asyncio.to_thread(verify_model, version_dir, EMBEDDING_DIM, probe=False)
        encoder = self.make_encoder(version)
        try:
            label = await probe_encoder(encoder, EMBEDDING_DIM)
            if version_number(label) != version:
                raise ModelMismatch(f"asked for version {version}, the encoder answered with {label!r}")
        except BaseException:
            await encoder.close()
            raise
        return encoder

    def refuse(self, version: int, exc: BaseException, then: str) -> None:
        """Record a refused version: one log line, ``model_error`` on ``/health``, a metric."""
        reason = one_line(exc)
        self.refused[version] = reason
        self.error = f"model version {version} refused ({reason}); {then}"
        log.error("%s", self.error)
        self.metrics.rollovers.labels("refused").inc()

    def _set_live(self, label: str) -> None:
        self.live = version_number(label)
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(label).set(1)
        if self.live is None:
            return
        marker = self.settings.data_dir / MARKER
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"version": self.live, "model_version": label}) + "\n", encoding="utf-8")
        except OSError as exc:
            log.warning("cannot record the live model version in %s: %s", marker, exc)

    def previous_version(self) -> int | None:
        """The version that was live when this worker last ran (``<data_dir>/model.json``)."""
        try:
            value = json.loads((self.settings.data_dir / MARKER).read_text(encoding="utf-8")).get("version")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, int) and value > 0 else None

    async def start_live_encoder(self) -> None:
        """Start-up: pin the live encoder to the configured (or newest) version that passes.

        A refused version is logged and shown on ``/health``; the previous version (or, when
        following the latest, the newest older one that passes) goes live instead. Raises
        ``ModelMismatch`` when no version passes, ``EncoderUnavailable`` while the encoder
        cannot be reached (the caller retries).
        """
        live = self.engine
        assert live.encoder is not None
        if not self.versioned:
            await live.encoder.start()
            self._set_live(live.encoder.model_version)
            return
        wanted = self.settings.model_version
        offered = await self.available_versions() if wanted is None else []
        if wanted is None and not offered:
            raise ConfigurationError(f"no model version is on offer at {self._where()}")
        target = wanted if wanted is not None else offered[-1]
        previous = self.previous_version()
        candidates = [target]
        if previous is not None and previous != target:
            candidates.append(previous)
        if wanted is None:
            candidates += [v for v in reversed(offered) if v < target and v not in candidates]
        first_error: BaseException | None = None
        for version in candidates:
            try:
                encoder = await self.verify(version)
            except ModelMismatch as exc:
                if first_error is None:
                    first_error = exc
                rest = candidates[candidates.index(version) + 1 :]
                self.refuse(version, exc, f"trying version {rest[0]}" if rest else "no version left to try")
                continue
            await live.encoder.close()
            live.encoder = encoder
            self._set_live(encoder.model_version)
            if version != target and first_error is not None:
                self.error = f"model version {target} refused ({one_line(first_error)}); version {version} is live"
                log.error("%s", self.error)
            return
        raise ModelMismatch(f"no usable model version ({', '.join(map(str, candidates))}): "
                            f"{one_line(first_error) if first_error else 'none on offer'}")

    def _where(self) -> str:
        encoder = self.settings.encoder
        return encoder if encoder.startswith("grpc://") else str(self.settings.model_base)

    # ------------------------------------------------------------------ triggers

    async def poll(self) -> None:
        """Follow the latest version (timer): start a rollover when a newer one is on offer."""
        interval = self.settings.model_poll_interval_s
        if (not self.versioned or interval <= 0 or self.settings.model_version is not None
                or self.override is not None or self.running or not self.ready.is_set()):
            return
        if time.monotonic() - self._last_poll < interval:
            return
        self._last_poll = time.monotonic()
        try:
            offered = await self.available_versions()
        except EncoderError as exc:
            log.warning("cannot list the model versions at %s: %s", self._where(), one_line(exc))
            return
        newest = offered[-1] if offered else None
        if newest is None or newest == self.live or newest in self.refused:
            return
        log.info("model version %s is on offer (live: %s): rolling over", newest, self.live)
        try:
            await self.begin(newest)
        except (ModelMismatch, EncoderError, RolloverBusy) as exc:
            log.debug("rollover to %s not started: %s", newest, exc)

    async def request(self, version: int) -> dict[str, Any]:
        """The admin endpoint: verify ``version`` now, then roll over in the background."""
        self.override = version
        self.refused.pop(version, None)
        if version == self.live and not self.running:
            return {"model_version": self.engine.model_version, "rollover": "already live"}
        await self.begin(version)
        return {"rollover": "started", **self.status.as_json()}

    async def begin(self, version: int) -> None:
        """Verify ``version`` and start the rollover task; raises when refused or busy."""
        if not self.versioned:
            raise ConfigurationError("the hashing encoder has no model versions to roll over to")
        if self.running:
            raise RolloverBusy(f"a rollover to {self.status.to_version} is running; see /health")
        if not self.ready.is_set():
            raise RolloverBusy("the worker is still starting")
        try:
            encoder = await self.verify(version)
        except ModelMismatch as exc:
            self.refuse(version, exc, f"{self.engine.model_version} stays live")
            raise
        self._task = asyncio.ensure_future(self._roll(encoder))

    # ------------------------------------------------------------------ the rollover

    async def _roll(self, encoder: Encoder) -> None:
        live = self.engine
        status = self.status = RolloverStatus(phase="embedding", from_version=live.model_version,
                                              to_version=encoder.model_version, started_at=time.time())
        log.info("model rollover %s -> %s started", status.from_version, status.to_version)
        self.metrics.rollover_active.set(1)
        self.metrics.rollover_progress.set(0)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simstream-rollover")
        generation = live.generation
        old_encoder = live.encoder
        old_core = live.core
        swapped = False
        try:
            new = await self._build(encoder, executor, generation)
            swapped = await self._catch_up_and_swap(new, generation)
            executor.shutdown(wait=False)
            status.phase = "republishing"
            await self._republish(old_core, live.generation)
            status.phase = "done"
            self.metrics.rollovers.labels("swapped").inc()
            log.info("model rollover %s -> %s done in %.1f s (%d texts embedded, %d changes caught up, "
                     "%d records republished)", status.from_version, status.to_version,
                     time.time() - (status.started_at or 0), status.embedded, status.caught_up, status.republished)
            if old_encoder is not None:
                await old_encoder.close()
        except asyncio.CancelledError:
            if not swapped:
                live.journal = None
                await encoder.close()
            raise
        except Exception as exc:  # a failed rollover must leave the old version serving
            status.phase = "failed"
            status.error = one_line(exc)
            if swapped:
                self.error = f"model rollover to {status.to_version}: republishing failed: {status.error}"
            else:
                live.journal = None
                await encoder.close()
                self.error = (f"model rollover {status.from_version} -> {status.to_version} failed, "
                              f"keeping {status.from_version}: {status.error}")
            log.error("%s", self.error, exc_info=not isinstance(exc, SimstreamError))
            self.metrics.rollovers.labels("failed").inc()
        finally:
            executor.shutdown(wait=False)
            status.finished_at = time.time()
            self.metrics.rollover_active.set(0)

    def _check_still_live(self, generation: int) -> None:
        if self.engine.generation != generation:
            raise RolloverAborted("the live core was replaced (rebuild-index) during the rollover; ask again")

    async def _build(self, encoder: Encoder, executor: ThreadPoolExecutor, generation: int) -> Engine:
        """Re-embed the catalog as it was at the start and build the new core from it."""
        live, status, settings = self.engine, self.status, self.settings
        async with self.batch_lock:  # a consistent cut: no batch is half applied
            catalog = await live.in_core(lambda: sorted(live.core.catalog, key=lambda p: p.product_id))
            behavior = await live.in_core(live.core.behavior_rows)
            live.journal = []
        blend = blend_for(settings, version_number(encoder.model_version))
        if blend != Blend.of(live.core.config):
            log.info("model rollover: version %s carries its own blend (lexical weight %g, floor %g, behaviour "
                     "weight %g)", encoder.model_version, blend.lexical_weight, blend.lexical_floor,
                     blend.behavior_weight)
        core = Recommender(blend.apply(live.core.config), owns=live.core.owns, lexical=live.core.lexical)
        new = Engine(settings, self.metrics, recommender=core, encoder=encoder, executor=executor,
                     encoder_ok=True, clock=live.clock)
        texts = sorted({product_text(p) for p in catalog})
        status.total = len(texts)
        vectors: dict[str, np.ndarray] = {}
        step = settings.rollover_batch_size
        for start in range(0, len(texts), step):
            self._check_still_live(generation)
            vectors.update(await new.embed(texts[start : start + step]))
            self._check_version(new, status.to_version)
            status.embedded = len(vectors)
            self.metrics.rollover_progress.set(status.progress)
            if settings.rollover_pause_s:
                await asyncio.sleep(settings.rollover_pause_s)
        self.metrics.rollover_progress.set(1.0)
        status.phase = "building"
        label = new.model_version
        for product in catalog:
            new.embeddings.hold(StoredEmbedding(
                product.product_id, vectors[product_text(product)], label, product.content_hash))
        started = time.monotonic()
        await new.apply_from_state([], catalog)
        if behavior:
            await new.in_core(core.apply_behavior, behavior)
        log.info("model rollover: new index of %d products built in %.1f s", len(catalog), time.monotonic() - started)
        return new

    def _check_version(self, new: Engine, expected: str | None) -> None:
        if new.model_version != expected:
            raise RolloverAborted(f"the encoder answered with {new.model_version!r} instead of {expected!r}")

    async def _replay(self, new: Engine, changes: list[ProductChange]) -> None:
        """Apply journaled changes to the new core (the engine's apply), embedding with the new version."""
        if not changes:
            return
        await new.apply([Change(change) for change in changes])
        self._check_version(new, self.status.to_version)
        self.status.caught_up += len(changes)

    async def _catch_up_and_swap(self, new: Engine, generation: int) -> bool:
        live, status = self.engine, self.status
        status.phase = "catching-up"
        assert live.journal is not None
        done = 0
        # Outside the lock while the journal grows faster than a batch: the stream keeps going.
        for _ in range(100):
            if len(live.journal) - done <= self.settings.rollover_batch_size:
                break
            end = len(live.journal)
            await self._replay(new, live.journal[done:end])
            done = end
            self._check_still_live(generation)
        async with self.batch_lock:
            self._check_still_live(generation)
            await self._replay(new, live.journal[done:])
            rows = await live.in_core(live.core.behavior_rows)
            await new.in_core(_sync_behavior, new.core, rows)
            for (kind, pid), version in live.core.versions.items():
                new.core.seed_version(kind, pid, version)
            live.journal = None
            live.encoder_ok = live.encoder_ok and new.encoder_ok
            live.embedded_texts += new.embedded_texts
            # The swap: readers and the next batch see the new core and encoder.
            live.swap(new.core, encoder=new.encoder, embeddings=new.embeddings)
            self.on_swap()
            self._set_live(live.model_version)
            self.error = None
            self.refused.clear()
        log.info("model rollover: swapped to %s (%d changes caught up)", live.model_version, status.caught_up)
        return True

    async def _republish(self, old_core: Recommender, generation: int) -> None:
        """Every list with the new model_version, then every embedding record; chunk by chunk."""
        live, settings = self.engine, self.settings
        core = live.core

        def every_key() -> list[tuple[Kind, str]]:
            keys: list[tuple[Kind, str]] = []
            for kind in Kind:
                held = core.lists(kind)
                keys += [(kind, pid) for pid in sorted(held)]
                if kind in CONTENT_KINDS:  # lists the old core had and the new one lacks: tombstones
                    keys += [(kind, pid) for pid in sorted(old_core.lists(kind).keys() - held.keys())]
            return keys

        keys: list[tuple[Kind, str]] = await live.in_core(every_key)
        for chunk in _chunks(keys, REPUBLISH_CHUNK):
            async with self.batch_lock:
                if live.generation != generation:
                    return  # replaced again (rebuild-index): the new owner republishes
                pubs = await live.in_core(lambda chunk=chunk: [core.republish(k, p) for k, p in chunk])
                records = live.lists_to_records(pubs)
                await self.publish(records)
            self.status.republished += len(records)
        for ids in _chunks(sorted(live.embeddings), REPUBLISH_CHUNK):
            async with self.batch_lock:
                if live.generation != generation:
                    return
                stored = await live.in_core(live.stored_embeddings, ids)
                records = [Outbound(settings.topic_embeddings, e.product_id, embedding_to_wire(e)) for e in stored]
                await self.publish(records)
            self.status.republished += len(records)

    # ------------------------------------------------------------------ reporting

    def health(self) -> dict[str, Any]:
        return {"model_error": self.error, "rollover": self.status.as_json(),
                "blend": asdict(Blend.of(self.engine.core.config))}


def _sync_behavior(core: Recommender, rows: dict[str, BehaviorRow]) -> None:
    """Make ``core``'s behaviour rows those of ``rows`` (rows it has and ``rows`` lacks are cleared)."""
    cleared = {pid: BehaviorRow() for pid in core.behavior_rows() if pid not in rows}
    core.apply_behavior({**rows, **cleared})


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def register_rollover_views(app: faust.App, rollover: ModelRollover, authorized: Callable[[Any], bool]) -> None:
    """``POST /admin/model-version`` (``{"version": N}``) and ``GET`` of the same path (the status)."""
    from faust.web import Request, Response, View

    engine = rollover.engine

    @app.page("/admin/model-version")
    class ModelVersion(View):
        """Roll over to another model version (token-guarded like the read API)."""

        async def get(self, request: Request) -> Response:
            if not authorized(request):
                return self.json({"error": "missing or wrong bearer token"}, status=401)
            return self.json({"model_version": engine.model_version if engine.encoder_ok else None,
                              **rollover.health()})

        async def post(self, request: Request) -> Response:
            if not authorized(request):
                return self.json({"error": "missing or wrong bearer token"}, status=401)
            if not rollover.ready.is_set():
                return self.json({"error": "the worker is still starting"}, status=503)
            try:
                body = json.loads(await request.read() or b"{}")
                version = body.get("version") if isinstance(body, dict) else None
            except ValueError:
                version = None
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                return self.json({"error": 'send {"version": N} with N a positive integer'}, status=400)
            try:
                return self.json(await rollover.request(version), status=202)
            except RolloverBusy as exc:
                return self.json({"error": str(exc)}, status=409)
            except ModelMismatch as exc:
                return self.json({"error": rollover.error or one_line(exc)}, status=422)
            except EncoderUnavailable as exc:
                return self.json({"error": f"the encoder is unreachable: {one_line(exc)}"}, status=503)
            except SimstreamError as exc:
                return self.json({"error": one_line(exc)}, status=400)
