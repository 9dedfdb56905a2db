"""``miniomni serve --ray``: replicas of the whole server on Ray Serve (see docs/scaling.md).

Each replica is one complete engine: it loads the checkpoint, runs an :class:`Engine` on a
compute thread of its own and serves :func:`create_app`'s FastAPI application through Ray's
HTTP proxy, so ``/v1/realtime``, ``/chat``, ``/healthz`` and the page behave as with
``miniomni serve``. Ray is imported only inside the functions here (``pip install
'miniomni-speech[ray]'``); the rest of the package never needs it.

Capacity: a replica holds ``max_answers`` talkers (WebSocket connections, or ``/chat``
streams). Ray may send it one request more (``max_ongoing_requests = max_answers + 1``), so
that a talker over capacity reaches a replica and is refused at once by the application
(the WebSocket is accepted and closed with 1013, "try again later"; ``/chat`` answers 503)
instead of waiting in the proxy's queue. Requests are routed to the least loaded replica.

``serve run miniomni.server.rayserve:build checkpoint=DIR max_answers=4`` (or a Serve
config file naming that import path, as a KubeRay ``RayService`` does) builds the same
application without the ``miniomni`` command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import install_hint
from .settings import SERVE_ENCODER_CONTEXT, ServerSettings, api_key_from_args, settings_from_args

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-miniomni-replica"  # on every HTTP response and WebSocket handshake: which replica answered
APP_NAME = "miniomni"
DEPLOYMENT_NAME = "MiniOmni"


@dataclass
class ReplicaSpec:
    """What one replica loads and serves: the checkpoint, how to load it, the engine's size, the settings."""

    checkpoint: str
    max_answers: int = 4
    load_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of miniomni.pipeline.load
    settings: ServerSettings = field(default_factory=ServerSettings)
    warm_up: bool = True  # answer a silent question before serving (pays PyTorch's one-time costs)


@dataclass
class ScaleOptions:
    """How many replicas, what each reserves, and how Ray's proxy queues (the deployment's options)."""

    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscale on talkers per replica
    max_replicas: int | None = None
    replica_cpus: float = 1.0
    max_queued_requests: int = 8  # per proxy, only while every replica holds max_answers + 1 requests
    graceful_shutdown_timeout_s: float = 10.0

    def deployment_options(self, max_answers: int) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options`` for replicas of ``max_answers`` talkers."""
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "max_ongoing_requests": max_answers + 1,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": 5.0,
        }
        if self.min_replicas is not None or self.max_replicas is not None:
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
            if not 0 <= low <= high or high < 1:
                raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got {low}, {high}")
            # Scale up before every replica is full: a replica at 70 % of its talkers asks for another.
            options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                             "initial_replicas": min(max(low, 1), high),
                                             "target_ongoing_requests": max(0.5, 0.7 * max_answers),
                                             "upscale_delay_s": 5.0, "downscale_delay_s": 120.0}
        else:
            if self.replicas < 1:
                raise ValueError(f"replicas must be at least 1, got {self.replicas}")
            options["num_replicas"] = self.replicas
        return options


class ReplicaHeader:
    """ASGI middleware: names the replica in a header of every HTTP response and WebSocket handshake."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def named(message: dict) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER.encode(), self.replica)]}
            await send(message)

        await self.app(scope, receive, named)


class ProxyWebSockets:
    """ASGI middleware for Ray's proxy: clear answers to WebSocket clients in two cases the proxy leaves unclear.

    * Refused by backpressure (every replica full and the proxy's queue too): the proxy answers a
      handshake with an HTTP response, which uvicorn turns into ``500 Internal Server Error``;
      here it goes out as what it is, ``503`` with Ray's reason (the WebSocket denial response).
    * A replica that crashed or was killed: the proxy drops the TCP connection and the client
      sees no close frame (1006); here the socket is closed with 1011 and a reason.

    Ray's proxy loads it through the environment variable
    ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=miniomni.server.rayserve.proxy_middlewares``,
    which must be set where the cluster starts (``miniomni serve --ray`` sets it for a cluster
    it starts itself).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        state = {"accepted": False, "closed": False}
        denial = "websocket.http.response" in scope.get("extensions", {})

        async def watched(message: dict) -> None:
            kind = message["type"]
            if kind == "websocket.accept":
                state["accepted"] = True
            elif kind in ("websocket.close", "websocket.http.response.start"):
                state["closed"] = True
            elif kind in ("http.response.start", "http.response.body") and not state["accepted"]:
                state["closed"] = True
                if not denial:  # the server cannot send an HTTP answer to a handshake: a close says no
                    if kind == "http.response.start":
                        await send({"type": "websocket.close", "code": 1013, "reason": "the server is full"})
                    return
                message = {**message, "type": "websocket." + kind}
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            if state["accepted"] and not state["closed"]:
                try:
                    await send({"type": "websocket.close", "code": 1011,
                                "reason": "the replica serving this session stopped; reconnect"})
                except Exception as exc:  # noqa: BLE001 - the client may be gone already
                    log.debug("closing an orphaned WebSocket: %s", exc)


PROXY_CALLBACK = "miniomni.server.rayserve.proxy_middlewares"


def proxy_middlewares() -> list:
    """Ray's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the proxy's middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyWebSockets)]


def replica_draining() -> bool:
    """True once Ray has asked this replica to stop (downscale, redeploy, ``serve.delete``).

    Ray waits for a stopping replica's requests to end before it calls ``__del__``, and a
    WebSocket never ends by itself, so the replica watches for the request instead. Ray has no
    public hook for it: this reads the replica's ``_shutting_down`` flag through the callback
    it keeps in the replica context, and says False where that is not found (other Ray versions).
    """
    from ray.serve.context import _get_internal_replica_context

    context = _get_internal_replica_context()
    callback = getattr(context, "_handle_registration_callback", None)
    for cell in getattr(callback, "__closure__", None) or ():
        try:
            owner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if hasattr(owner, "_shutting_down"):
            return bool(owner._shutting_down)
    return False


class EngineReplica:
    """One replica's server: the model, its engine on a compute thread, the FastAPI app, the shutdown watch."""

    def __init__(self, spec: ReplicaSpec, replica_id: str, draining: Any = None) -> None:
        import torch

        from ..pipeline import load
        from ..precision import confirm_codec, confirm_prompts
        from .app import create_app
        from .engine import Engine

        self.replica_id = replica_id
        omni = load(spec.checkpoint, **spec.load_options)
        omni.plan = confirm_prompts(omni.model, confirm_codec(omni.codec, omni.plan))
        # A talker is a connection here: past max_answers of them the app refuses with 1013 at once.
        settings = ServerSettings(**{**asdict(spec.settings), "max_connections": spec.max_answers})
        self.engine = Engine(omni, max_answers=spec.max_answers, start=False)
        if spec.warm_up:
            self.engine.warm_up()
        log.info("replica %s: %d concurrent answers, %d torch threads", replica_id, spec.max_answers,
                 torch.get_num_threads())
        # In a replica the actor's threads own the main thread: the engine computes on one of its own.
        self.compute = threading.Thread(target=self._compute, name="miniomni-compute", daemon=True)
        self.compute.start()
        self.app = create_app(self.engine, settings)
        self.app.add_middleware(ReplicaHeader, replica=replica_id)
        self._closed = threading.Event()
        self._shut = False
        self._draining = draining or replica_draining
        self.watch = threading.Thread(target=self._watch, name="miniomni-drain-watch", daemon=True)
        self.watch.start()

    def _compute(self) -> None:
        from .priority import lower_other_threads

        # Ray's threads and the app's run below this one, and so do the threads they start later.
        log.info("replica %s: %d other threads lowered in priority", self.replica_id, lower_other_threads())
        self.engine.run_forever()

    def healthy(self) -> bool:
        """Whether the compute thread still runs."""
        return self.compute.is_alive()

    def shut_down(self) -> None:
        """End every answer with ``server_shutting_down`` and close every connection with 1001 (once)."""
        from .app import shut_down

        if self._shut:
            return
        self._shut = True
        log.info("replica %s is stopping: ending its sessions", self.replica_id)
        closed = shut_down(self.app)
        if closed is not None:
            try:
                closed.result(timeout=5)
            except Exception as exc:  # noqa: BLE001 - a slow close must not stop the replica's shutdown
                log.warning("replica %s: closing its connections: %s", self.replica_id, exc)

    def _watch(self) -> None:
        while not self._closed.wait(0.2):
            try:
                if self._draining():
                    self.shut_down()
                    return
            except Exception as exc:  # noqa: BLE001 - the watch is best effort
                log.warning("replica %s: cannot tell whether Ray stops it (%s)", self.replica_id, exc)
                return

    def close(self) -> None:
        """Stop: sessions end as in :meth:`shut_down`, then the engine and its thread."""
        self.shut_down()
        self._closed.set()
        self.engine.close()
        self.compute.join(timeout=10)


def _deployment() -> Any:
    """The Serve deployment class (built on first use, so that importing this module needs no ray)."""
    from ray import serve

    @serve.deployment
    @serve.ingress()
    class MiniOmniReplica:
        """A replica: the whole engine, with create_app's FastAPI application as its ingress."""

        def __init__(self, spec: ReplicaSpec) -> None:
            replica_id = serve.get_replica_context().replica_id.unique_id
            self.server = EngineReplica(spec, replica_id)

        def __serve_build_asgi_app__(self) -> Any:
            return self.server.app

        def check_health(self) -> None:
            if not self.server.healthy():
                raise RuntimeError("the compute thread has stopped")

        def __del__(self) -> None:
            server = getattr(self, "server", None)
            if server is not None:
                server.close()

    return MiniOmniReplica


_ROUTER: Any = None


def least_loaded_router() -> Any:
    """A request router that considers every replica and picks the one with the fewest requests.

    Ray's default samples two replicas at random: with more than two, a talker could meet two
    full replicas and be refused while a third has room. Ray finds the class again by its import
    path, ``miniomni.server.rayserve.LeastLoadedRouter`` (made on first use, see ``__getattr__``).
    """
    global _ROUTER
    if _ROUTER is None:
        from ray.serve.request_router import RequestRouter

        class LeastLoadedRouter(RequestRouter):
            async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
                return [list(candidate_replicas)]

        LeastLoadedRouter.__module__ = __name__
        _ROUTER = LeastLoadedRouter
    return _ROUTER


def __getattr__(name: str) -> Any:
    if name == "LeastLoadedRouter":  # Ray's proxy imports the router by this path
        return least_loaded_router()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def application(spec: ReplicaSpec, scale: ScaleOptions | None = None) -> Any:
    """The Serve application (``serve.run`` it with ``route_prefix="/"``)."""
    from ray.serve.config import RequestRouterConfig

    scale = scale or ScaleOptions()
    options = scale.deployment_options(spec.max_answers)
    options["request_router_config"] = RequestRouterConfig(request_router_class=least_loaded_router())
    return _deployment().options(**options).bind(spec)


def build(args: dict[str, Any]) -> Any:
    """Application builder for ``serve run miniomni.server.rayserve:build key=value ...`` and Serve config files.

    Keys: ``checkpoint`` (required), ``max_answers`` (or its former name ``max_sessions``), ``replicas``,
    ``min_replicas``, ``max_replicas``, ``replica_cpus``, ``quantize``, ``encoder_context`` (30, 10, 5 or audio; default
    :data:`~miniomni.server.settings.SERVE_ENCODER_CONTEXT`), ``fast_encoder`` (true: short for
    ``encoder_context=audio``), ``api_key`` (else ``MINIOMNI_API_KEY``), ``turn_model``.
    """
    if "checkpoint" not in args:
        raise ValueError("the application needs checkpoint=DIR")

    def number(key: str, kind: type, default: Any) -> Any:
        return kind(args[key]) if args.get(key) not in (None, "") else default

    settings = ServerSettings(api_key=args.get("api_key") or os.environ.get("MINIOMNI_API_KEY"),
                              turn_model=args.get("turn_model"),
                              max_audio_seconds=number("max_audio_seconds", float, 30.0))
    load_options: dict[str, Any] = {"device": args.get("device", "auto"),
                                    "quantize": _quantize(args.get("quantize", "auto"), args.get("device", "auto")),
                                    "encoder_context": _encoder_context(args)}
    answers = number("max_answers", int, number("max_sessions", int, 4))
    spec = ReplicaSpec(checkpoint=str(args["checkpoint"]), max_answers=answers, load_options=load_options,
                       settings=settings)
    scale = ScaleOptions(replicas=number("replicas", int, 1), min_replicas=number("min_replicas", int, None),
                         max_replicas=number("max_replicas", int, None),
                         replica_cpus=number("replica_cpus", float, 1.0))
    return application(spec, scale)


def _encoder_context(args: dict[str, Any]) -> str:
    """``encoder_context`` of :func:`build`'s arguments, ``fast_encoder=true`` standing for ``audio``."""
    from ..audio import ENCODER_CONTEXTS

    context = str(args.get("encoder_context") or "")
    if str(args.get("fast_encoder", "")).lower() in ("1", "true", "yes"):
        if context not in ("", "audio"):
            raise ValueError(f"fast_encoder=true means encoder_context=audio; it contradicts encoder_context={context}")
        return "audio"
    if context and context not in ENCODER_CONTEXTS:
        raise ValueError(f"encoder_context={context} is not one of {', '.join(ENCODER_CONTEXTS)}")
    return context or SERVE_ENCODER_CONTEXT


def _quantize(quantize: str, device: str) -> str:
    from ..devices import resolve_device

    if quantize == "auto":
        return "int8" if resolve_device(device).type == "cpu" else "none"
    return quantize


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """``miniomni serve``'s flags for Ray Serve (they do nothing without ``--ray``)."""
    p.add_argument("--ray", action="store_true",
                   help=f"serve replicas of the whole engine on Ray Serve ({install_hint('ray')}; "
                        "see docs/scaling.md)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (default 1)")
    p.add_argument("--min-replicas", type=int, default=None, help="with --ray: autoscale from this many replicas")
    p.add_argument("--max-replicas", type=int, default=None, help="with --ray: autoscale up to this many")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs each replica reserves")
    p.add_argument("--ray-address", default=None,
                   help="with --ray: a running cluster (auto, or ray://HOST:PORT); default: start one here")


def serve_from_args(args: argparse.Namespace) -> int:
    """``miniomni serve --ray``: start (or join) Ray, run the application, stop it on SIGINT or SIGTERM."""
    from ..errors import MiniOmniError, install_hint
    from .turns.endofturn import turn_model_for_serving

    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise MiniOmniError(f"--ray needs Ray Serve ({exc}); {install_hint('ray')}") from exc
    turn_model = turn_model_for_serving(args.turn_model, args.checkpoint)
    settings = settings_from_args(args, api_key_from_args(args), turn_model)
    load_options = {"device": args.device, "dtype": args.dtype, "quantize": _quantize(args.quantize, args.device),
                    "encoder_context": args.encoder_context, "encoder_dtype": args.encoder_dtype,
                    "codec_dtype": args.codec_dtype, "int8_activations": args.int8_activations}
    spec = ReplicaSpec(checkpoint=os.path.abspath(args.checkpoint) if os.path.exists(args.checkpoint)
                       else args.checkpoint, max_answers=args.max_answers, load_options=load_options,
                       settings=settings)
    scale = ScaleOptions(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                         replica_cpus=args.replica_cpus)
    try:
        app = application(spec, scale)
    except ValueError as exc:
        raise MiniOmniError(str(exc)) from exc
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)  # for a cluster started here
    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False)
    # After ray.init, which installs handlers of its own: a signal from here on stops the replicas cleanly.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    http = {"host": args.host, "port": args.port, "request_timeout_s": None,  # a talk may last for hours
            "ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile}
    serve.start(http_options=http)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    log.info("serving on Ray: http://%s:%d/ (%s)", args.host, args.port,
             f"{scale.min_replicas}..{scale.max_replicas} replicas" if scale.max_replicas or scale.min_replicas
             else f"{scale.replicas} replica(s)")
    while not stop.wait(1.0):
        pass
    started = time.monotonic()
    serve.delete(APP_NAME)  # each replica ends its sessions (server_shutting_down, 1001), then stops
    log.info("stopped the replicas in %.1f s", time.monotonic() - started)
    if args.ray_address is None:
        serve.shutdown()
        ray.shutdown()
    return 0
