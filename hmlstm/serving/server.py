"""The gRPC service: streaming and unary segmentation on ONNX Runtime (grpc.aio).

``SegmenterServer`` owns everything a running server has: the loaded model,
the runner that keeps inference off the event loop, the stream registry,
health, reflection, metrics, auth and TLS. ``serve(config, model_path)`` runs
one until SIGTERM or SIGINT, then shuts down gracefully: health goes
NOT_SERVING, new calls are refused, open streams get ``grace_s`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from hmlstm.serving import messages
from hmlstm.serving.batching import BatchingRunner
from hmlstm.serving.config import ServeConfig
from hmlstm.serving.metrics import Metrics
from hmlstm.serving.model import LoadedModel
from hmlstm.serving.ports import check_port_free
from hmlstm.serving.runner import Runner
from hmlstm.serving.saver import Saver
from hmlstm.serving.store import StoreUnavailable, decode_record, open_store
from hmlstm.serving.stream import StreamError, StreamRegistry, StreamState
from hmlstm.v1 import segmenter_pb2 as pb
from hmlstm.v1 import segmenter_pb2_grpc as pb_grpc

log = logging.getLogger("hmlstm.serve")
SERVICE = pb.DESCRIPTOR.services_by_name["Segmenter"].full_name


class Undecodable:
    """What a request that is not a valid message decodes to, so the handler can answer INVALID_ARGUMENT
    (gRPC would answer UNKNOWN and log a traceback for a deserializer that raises)."""

    __slots__ = ("type_name", "reason")

    def __init__(self, type_name: str, reason: str):
        self.type_name, self.reason = type_name, reason

    def error(self) -> StreamError:
        return StreamError("INVALID_ARGUMENT", f"the message could not be decoded as {self.type_name} "
                           f"({self.reason}); string fields must be valid UTF-8")


def _decoder(message_type):
    parse = message_type.FromString

    def decode(data: bytes):
        try:
            return parse(data)
        except Exception as e:  # DecodeError; a string field that is not UTF-8
            return Undecodable(message_type.DESCRIPTOR.name, (str(e).splitlines() or [type(e).__name__])[0][:120])

    return decode


def add_servicer(servicer, server) -> None:
    """Register the Segmenter service like the generated stubs do, with decoders that never raise."""
    handlers = {
        "StreamSegment": grpc.stream_stream_rpc_method_handler(
            servicer.StreamSegment, _decoder(pb.SegmentRequest), pb.SegmentResponse.SerializeToString),
        "Segment": grpc.unary_unary_rpc_method_handler(
            servicer.Segment, _decoder(pb.SegmentTextRequest), pb.SegmentTextResponse.SerializeToString),
        "DescribeModel": grpc.unary_unary_rpc_method_handler(
            servicer.DescribeModel, _decoder(pb.DescribeModelRequest), pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class SegmenterServicer(pb_grpc.SegmenterServicer):
    def __init__(self, model: LoadedModel, runner: Runner, registry: StreamRegistry, config: ServeConfig,
                 metrics: Metrics, saver: Saver | None = None):
        self.model, self.runner, self.registry = model, runner, registry
        self.config, self.metrics = config, metrics
        self.saver = saver  # None without a state store (--state-store memory)
        self._peers: dict[str, float] = {}  # peer -> when its first call came (with --max-connection-age)
        self.calls: set[asyncio.Task] = set()  # every StreamSegment handler running, registered or not yet
        self.shutdown_note: str | None = None  # set when the grace period ends: the status of calls still open
        # The advertised unary limit is one whose answer always fits the message limit (messages.py).
        self.max_text_chars = min(config.max_text_chars,
                                  messages.max_unary_chars(config.max_message_bytes, len(model.boundary_layers)))

    async def _load_stored(self, stream_id: str, resume: bool) -> None:
        """Bring a stream from the store into the registry if the store's copy is the newer one."""
        try:
            record = await self.saver.load(stream_id)
        except StoreUnavailable as e:
            if resume and not self.registry.held(stream_id):
                raise StreamError("UNAVAILABLE", f"the state store is unreachable ({e}); retry the resume") from None
            return
        if record is None:
            return
        if not resume:
            raise StreamError("ALREADY_EXISTS", f"stream {stream_id!r} exists; resume it (resume = true) or "
                              "choose another id")
        r = decode_record(record)
        end = r["processed"] + sum(len(t) for _, t in r["texts"])
        held = self.registry.get(stream_id)
        if held is not None and (held.attached or held.processed >= end):
            return
        st = StreamState.from_record(r)
        for offset, text in st.pending:  # rebuild the rewind history by running the chunks again
            await self.runner.process_chunk(st, offset, text, self.config.piece_chars)
        st.pending = []
        self.registry.adopt(st)

    def _layers(self, requested) -> list[int]:
        allowed = self.model.boundary_layers
        layers = sorted(set(requested)) or allowed
        bad = [l for l in layers if l not in allowed]
        if bad:
            raise StreamError("INVALID_ARGUMENT", f"layer(s) {bad} cannot report boundaries; this model's "
                              f"boundary layers are {allowed}")
        return layers

    async def _fail(self, context, code: str, message: str):
        self.metrics.errors.labels(code).inc()
        await context.abort(getattr(grpc.StatusCode, code), message)

    async def _fail_cancelled(self, context, code: str, message: str) -> None:
        """The status of a call being cancelled (a takeover, the end of the grace period, the idle watchdog).
        Its transport may be gone or busy sending already: then there is no one to tell, and nothing to log."""
        try:
            await self._fail(context, code, message)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # ExecuteBatchError, UsageError: the call ended under us
            log.debug("status %s not sent to a call that ended: %s", code, e)

    async def _take_over(self, stream_id: str, timeout_s: float = 5.0) -> None:
        """A resume wins over the call still attached to its stream.

        That call is usually a dead connection the server has not noticed yet (a client that
        reconnects does so because its call broke). It is cancelled, and answered ABORTED if
        its client is still there; the resume goes on once it has let go. Whatever it was
        doing is safe to drop: the resume rewinds to the last response its client received.
        """
        held = self.registry.get(stream_id)
        if held is None or not held.attached or held.owner is None or held.owner.done():
            return
        held.taken_over = True
        held.owner.cancel()
        try:
            await asyncio.wait_for(held.released.wait(), timeout_s)
        except asyncio.TimeoutError:
            return  # the registry then answers ABORTED: retry
        self.metrics.takeovers.inc()

    def _count_cancel(self, since: float | None) -> None:
        """A call that ended cancelled: a cut by --max-connection-age (its connection, first seen making a call
        at ``since``, is older than that: gRPC cuts calls the grace period after its GOAWAY) counts as such,
        anything else as CANCELLED. The connection's age is bounded below by its first call's: a client that
        cancels by itself late in an old connection counts as a cut too."""
        age = self.config.max_connection_age_s
        if since is not None and age is not None and time.monotonic() - since >= 0.9 * age:  # gRPC jitters +-10%
            self.metrics.age_cuts.inc()
        else:
            self.metrics.errors.labels("CANCELLED").inc()

    def _connection_since(self, context) -> float | None:
        """When this call's connection (its peer address) first made a call; None without
        --max-connection-age. Read at the call's start: the call's own objects are gone once it is cut."""
        if self.config.max_connection_age_s is None:
            return None
        peer = context.peer()
        if peer not in self._peers:
            if len(self._peers) >= 100_000:  # connections long gone: forget the oldest
                for old in list(self._peers)[:10_000]:
                    del self._peers[old]
            self._peers[peer] = time.monotonic()
        return self._peers[peer]

    async def StreamSegment(self, request_iterator, context):
        self.metrics.requests.labels("StreamSegment").inc()
        since = self._connection_since(context)
        self.calls.add(asyncio.current_task())
        it = request_iterator.__aiter__()
        idle = self.config.idle_timeout_s
        st: StreamState | None = None
        finished = False
        try:
            try:  # later waits are watched by the server's watchdog (_expire_loop), not a timer per message
                first = await asyncio.wait_for(it.__anext__(), idle)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise StreamError("DEADLINE_EXCEEDED", f"no message for {idle:g}s (idle timeout)") from None
            if isinstance(first, Undecodable):
                raise first.error()
            if not first.HasField("config"):
                raise StreamError("FAILED_PRECONDITION", "the first message must be a StreamConfig; "
                                  "send the config before any chunk")
            cfg = first.config
            if len(cfg.stream_id) > 128:
                raise StreamError("INVALID_ARGUMENT", "stream_id is longer than 128 characters")
            if not cfg.resume:
                layers = self._layers(cfg.layers)
                if cfg.top_k > self.config.max_top_k:
                    raise StreamError("INVALID_ARGUMENT", f"top_k {cfg.top_k} is over the limit of "
                                      f"{self.config.max_top_k}")
            if self.saver is not None and cfg.stream_id:
                await self._load_stored(cfg.stream_id, cfg.resume)
            if cfg.resume and cfg.stream_id:
                held = self.registry.get(cfg.stream_id)
                if held is not None:  # a resume that will be refused changes nothing, not even who is attached
                    held.check_rewind(cfg.resume_offset)
                await self._take_over(cfg.stream_id)
            st = self.registry.open(
                lambda: StreamState(self.model.zero_state(1), layers, cfg.top_k, cfg.stream_id,
                                    alignment=self.model.alignment, lookahead=self.model.lookahead), cfg.stream_id,
                cfg.resume, cfg.resume_offset)
            st.claim(asyncio.current_task(), asyncio.Event())
            st.context = context
            self.metrics.active_streams.set(self.registry.active)
            self.metrics.held_streams.set(len(self.registry))
            durable = self.saver is not None and bool(st.stream_id)
            while True:
                st.wait("read")
                try:
                    req = await it.__anext__()
                except StopAsyncIteration:
                    req = None
                st.wait("")
                if req is None:
                    if context.cancelled():  # grpc.aio ends the request stream on a cancel too
                        self._count_cancel(since)
                        return
                    break
                if isinstance(req, Undecodable):
                    raise req.error()
                if req.HasField("config"):
                    raise StreamError("FAILED_PRECONDITION", "a StreamConfig may only be the first message")
                if not req.HasField("chunk"):
                    raise StreamError("INVALID_ARGUMENT", "an empty SegmentRequest: after the config, every "
                                      "message must carry a chunk")
                t0 = time.perf_counter()
                chunk = req.chunk
                new = st.accept(chunk.offset, chunk.text, self.config.max_chunk_chars)
                if not new:
                    response = messages.response_pb(st.duplicate(chunk.offset), durable and self.saver.durable(st))
                else:
                    result = await self.runner.process_chunk(st, chunk.offset, new, self.config.piece_chars)
                    # The response waits for its save at most --store-timeout, and says whether it made it.
                    saved = await self.saver.save(st) if durable else False
                    self.metrics.chunk_latency.observe(time.perf_counter() - t0)
                    response = messages.response_pb(result, saved)
                st.wait("write")
                yield response
                st.wait("")
            # The stream is forgotten only once the final response went out: a cancel can
            # look like a half-close, and then the stream must stay resumable.
            st.wait("write")
            yield messages.response_pb(await self.runner.finish(st))
            st.wait("")
            finished = not context.cancelled()
            if finished and durable:
                self.saver.finished(st.stream_id)
        except StreamError as e:
            await self._fail(context, e.code, str(e))
        except asyncio.CancelledError:
            if st is not None and st.taken_over:  # a newer call resumed this stream
                await self._fail_cancelled(context, "ABORTED", "a newer call resumed this stream and took it over")
            if st is not None and st.shut_down:  # the server's grace period ended with this call open
                await self._fail_cancelled(context, "UNAVAILABLE", st.shut_down)
            if st is None and self.shutdown_note:  # ...before this call had opened its stream
                await self._fail_cancelled(context, "UNAVAILABLE", self.shutdown_note)
            if st is not None and st.idle_expired == "read":  # the watchdog ended a silent call
                resumable = "; the stream can be resumed by its id" if st.stream_id else ""
                await self._fail_cancelled(context, "DEADLINE_EXCEEDED",
                                           f"no message for {idle:g}s (idle timeout){resumable}")
            if st is None or st.idle_expired != "write":  # the watchdog counted that one
                self._count_cancel(since)
            raise
        except GeneratorExit:
            # Closed while waiting to send (gRPC cancelled the call at its await, not in this code): a
            # client that went away or cancelled, a takeover, or a call the watchdog ended.
            if st is not None and st.taken_over:
                self.metrics.errors.labels("ABORTED").inc()
            elif st is None or st.idle_expired != "write":
                self._count_cancel(since)
            raise
        finally:
            self.calls.discard(asyncio.current_task())
            if st is not None:
                self.registry.detach(st, finished)
                self.metrics.active_streams.set(self.registry.active)
                self.metrics.held_streams.set(len(self.registry))

    async def Segment(self, request, context):
        self.metrics.requests.labels("Segment").inc()
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            layers = self._layers(request.layers)
            if len(request.text) > self.max_text_chars:
                raise StreamError("INVALID_ARGUMENT", f"text has {len(request.text):,} characters, over the limit "
                                  f"of {self.max_text_chars:,} (ModelInfo.max_text_chars); use StreamSegment")
        except StreamError as e:
            await self._fail(context, e.code, str(e))
        st = StreamState(self.model.zero_state(1), layers, 0, alignment=self.model.alignment,
                         lookahead=self.model.lookahead)
        results = []
        try:
            if request.text:
                results.append(await self.runner.process_chunk(st, 0, request.text, self.config.piece_chars))
            results.append(await self.runner.finish(st))
        except asyncio.CancelledError:  # the client's deadline passed, or it cancelled or went away
            left = context.time_remaining()
            self.metrics.errors.labels("DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED").inc()
            raise
        return messages.text_response_pb(results, len(request.text))

    async def DescribeModel(self, request, context):
        self.metrics.requests.labels("DescribeModel").inc()
        if isinstance(request, Undecodable):
            await self._fail(context, "INVALID_ARGUMENT", str(request.error()))
        return messages.model_info_pb(self.model, self.config.max_chunk_chars, self.max_text_chars,
                                      self.config.worker_index)


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
# A health-checking service name (not a gRPC service) that reports the state store: NOT_SERVING while
# it is down. The server itself stays SERVING then: streams go on, without durability.
STORE_HEALTH = "hmlstm.v1.StateStore"


class Health(health.aio.HealthServicer):
    """Standard health checking, with ``List`` (the package's servicer answers it UNIMPLEMENTED)."""

    async def List(self, request, context):
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()})


def add_reflection(server, services: tuple[str, ...]) -> None:
    """Server reflection as ``grpc.reflection.v1`` and ``v1alpha``. grpcio-reflection implements only
    v1alpha; v1's messages are the same on the wire, so the same servicer answers both names."""
    names = (*services, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.aio.ReflectionServicer(names)
    for service in (reflection.SERVICE_NAME, REFLECTION_V1):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo, reflection_pb2.ServerReflectionRequest.FromString,
            reflection_pb2.ServerReflectionResponse.SerializeToString)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),))


class BearerAuth(grpc.aio.ServerInterceptor):
    """Calls need ``authorization: Bearer <token>``; health and reflection are open (probes)."""

    OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, token: str, metrics: Metrics):
        self.token = token
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        if details.method.startswith(self.OPEN):
            return await continuation(details)
        md = dict(details.invocation_metadata or ())
        scheme, _, token = (md.get("authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and token.strip() == self.token:  # the scheme is case-insensitive (RFC 6750)
            return await continuation(details)
        self.metrics.errors.labels("UNAUTHENTICATED").inc()
        msg = "missing or wrong bearer token; send metadata 'authorization: Bearer <token>'"

        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

        async def deny_stream(request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)
            yield  # pragma: no cover

        if details.method.endswith("/StreamSegment"):
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny_unary)


class SegmenterServer:
    def __init__(self, model: LoadedModel, config: ServeConfig):
        self.model, self.config = model, config
        self.metrics = Metrics(model.runtime.cpu)
        self.registry = StreamRegistry(config.max_streams, config.idle_timeout_s)
        bind = config.io_binding == "on" or (config.io_binding == "auto" and model.runtime.on_cuda)
        if config.batching:
            self.runner: Runner = BatchingRunner(model, config.batch_rows, config.max_wait_us,
                                                 self.metrics, attached=lambda: self.registry.active, io_binding=bind,
                                                 max_wait_fraction=config.max_wait_fraction)
        else:
            self.runner = Runner(model, config.call_threads, io_binding=bind, metrics=self.metrics)
        self.health = Health()
        interceptors = [BearerAuth(config.auth_token, self.metrics)] if config.auth_token else []
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # gRPC shares ports by default (SO_REUSEPORT): only a supervisor's own workers may (workers.py)
            ("grpc.so_reuseport", 1 if config.reuse_port else 0),
        ]
        if config.max_connection_age_s is not None:  # GOAWAY after this; clients reconnect, re-resolving
            options += [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_s * 1000))]
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        self.store = open_store(config.state_store, timeout_s=config.store_io_timeout_s)
        self.saver = None if self.store is None else Saver(
            self.store, config.idle_timeout_s, config.store_timeout_s, self.metrics, config.persist_depth,
            on_status=self._store_status, io_timeout_s=config.store_io_timeout_s)
        self.servicer = SegmenterServicer(model, self.runner, self.registry, config, self.metrics, self.saver)
        add_servicer(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        add_reflection(self.server, (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        self.port = 0
        self.metrics_port: int | None = None
        self._expiry: asyncio.Task | None = None
        self._late_statuses: set[asyncio.Task] = set()

    async def start(self) -> int:
        try:
            return await self._start()
        except BaseException:
            self.metrics.close()
            await self.server.stop(None)  # an unstarted gRPC server left to the garbage collector warns
            raise

    async def _start(self) -> int:
        host = self.config.host
        addr = f"{host}:{self.config.port}"
        if self.config.metrics_port is not None:  # first: a taken metrics port must not leave gRPC running
            try:
                self.metrics_port = self.metrics.serve_http(host, self.config.metrics_port)
            except OSError as e:
                raise OSError(f"metrics port {self.config.metrics_port} on {host} is not available "
                              f"({e.strerror or e}); choose another --metrics-port, or -1 for none") from None
        if not self.config.reuse_port:
            check_port_free(host, self.config.port)  # one clear line instead of gRPC's bind error
        if self.config.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())])
            add = lambda: self.server.add_secure_port(addr, creds)  # noqa: E731
        else:
            add = lambda: self.server.add_insecure_port(addr)  # noqa: E731
        try:
            self.port = add()
        except RuntimeError as e:  # gRPC raises a bare RuntimeError when it cannot bind
            raise OSError(f"cannot listen on {addr}: {str(e).splitlines()[0][:160]}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {addr}")
        await self.server.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.saver is not None:
            await self.saver.start()  # the store's state measured now, and watched from here on
            await self._store_status(self.saver.up)
        self._expiry = asyncio.create_task(self._expire_loop())
        return self.port

    async def _store_status(self, up: bool) -> None:
        """The health service name STORE_HEALTH follows the state store; the server's own stays SERVING."""
        await self.health.set(STORE_HEALTH, health_pb2.HealthCheckResponse.SERVING if up
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _expire_loop(self) -> None:
        """The idle-timeout watchdog: ends calls stalled on their client (waiting for its next message,
        or for it to read a response) and forgets detached streams, every quarter of the timeout
        (at most 5 s), so a stalled call ends between 1 and 1.25 idle timeouts after it stalled."""
        period = max(0.05, min(self.config.idle_timeout_s / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            for st in self.registry.stalled():
                if st.owner is None or st.owner.done() or st.idle_expired:
                    continue
                st.idle_expired = st.waiting
                st.owner.cancel()
                if st.waiting == "write":
                    self._end_unread(st)
            if self.registry.expire():
                self.metrics.held_streams.set(len(self.registry))

    def _end_unread(self, st: StreamState) -> None:
        """End a call whose client stopped reading: its unread responses filled the transport's
        flow-control window, so the handler is cancelled (the stream's slot is free at once, and
        it stays resumable) and the status is queued behind those responses: a client that reads
        again gets them, then DEADLINE_EXCEEDED. One that never reads holds only the transport's
        window until it disconnects."""
        idle = self.config.idle_timeout_s
        self.metrics.errors.labels("DEADLINE_EXCEEDED").inc()
        log.info("stream %s: its client read no response for %gs (idle timeout); call ended",
                 st.stream_id or "(no id)", idle)
        resumable = "; the stream can be resumed by its id" if st.stream_id else ""
        message = f"the client did not read its responses for {idle:g}s (idle timeout){resumable}"

        async def late_status(context):
            try:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)
            except BaseException:  # AbortError once sent; a batch error if the client went away
                pass

        task = asyncio.create_task(late_status(st.context))
        self._late_statuses.add(task)
        task.add_done_callback(self._late_statuses.discard)

    async def stop(self, grace: float | None = None, hurry: asyncio.Event | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let open ones finish within ``grace``; then end each stream
        still open with UNAVAILABLE and a message that names the shutdown and says whether the stream can
        be resumed by its id, instead of leaving it to gRPC's cancellation (a generic status for the
        client, an unhandled-exception line per stream in the log)."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.create_task(self.server.stop(grace + 5.0))  # refuses new calls now
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.registry.active and loop.time() < deadline and not stopping.done() \
                and not (hurry is not None and hurry.is_set()):  # a second Ctrl-C or SIGTERM ends the grace now
            await asyncio.sleep(0.05)
        if hurry is not None and hurry.is_set():
            grace = loop.time() - (deadline - grace)  # what the streams actually had
        open_now = [st for st in self.registry.attached_streams() if st.owner is not None and not st.owner.done()]
        for st in open_now:
            if not st.stream_id:
                then = "it has no stream_id, so it cannot be resumed"
            elif self.store is None:
                then = ("its state was held in this process only (--state-store memory), so it cannot be resumed "
                        "after the server exits")
            else:
                then = (f"the stream can be resumed by its id ({st.stream_id!r}) from the state store, on another "
                        "replica or once this one is back")
            st.shut_down = f"the server is shutting down and its {grace:g}s grace period ended with this stream " \
                           f"open; {then}"
            st.owner.cancel()
        # Calls that had not opened their stream yet (no config read, a resume still loading) are in no
        # registry: they get the same status now, not gRPC's "Cancelling all calls" when its own grace ends.
        owners = {st.owner for st in open_now}
        starting = [t for t in self.servicer.calls if t not in owners and not t.done()]
        self.servicer.shutdown_note = (f"the server is shutting down and its {grace:g}s grace period ended before "
                                       "this call had opened its stream; open it again (on another replica, or "
                                       "once this one is back)")
        for task in starting:
            task.cancel()
        if open_now or starting:
            log.info("shutdown: %d stream(s) still open after %gs ended with UNAVAILABLE",
                     len(open_now) + len(starting), grace)
        await stopping
        if self._expiry:
            self._expiry.cancel()
        for task in list(self._late_statuses):
            task.cancel()
        self.runner.close()
        self.metrics.close()
        if self.saver is not None:
            await self.saver.close()
            self.store.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve(model: LoadedModel, config: ServeConfig, ready=None) -> int | None:
    """Run until SIGTERM/SIGINT; then shut down gracefully (a second signal ends the grace period at once).
    Returns the first signal's number (None if the server ended otherwise)."""
    server = SegmenterServer(model, config)
    port = await server.start()
    tls = "TLS" if config.tls_cert else "plaintext"
    auth = ", bearer-token auth" if config.auth_token else ""
    metrics = f", metrics on http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    log.info("serving %s on %s:%d (%s%s)%s, state store: %s", model.path.name, config.host, port, tls, auth,
             metrics, config.state_store)
    bound = server.runner.binder is not None
    where = ("recurrent state stays on the device between calls (IO binding)" if bound and model.runtime.on_cuda
             else "IO binding on, with the model on the CPU: the recurrent state is host memory either way" if bound
             else "recurrent state returns to the host after each call")
    log.info("%s; %s", model.runtime.note, where)
    if ready is not None:
        ready(server)
    stop, hurry = asyncio.Event(), asyncio.Event()
    received: list[int] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        received.append(sig)
        if stop.is_set():
            if not hurry.is_set():
                log.info("second %s: ending the grace period now", signal.Signals(sig).name)
            hurry.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    waiter = asyncio.create_task(server.wait())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("shutting down: health NOT_SERVING, open streams have %gs to finish (Ctrl-C again: at once)",
                 config.grace_s)
        await server.stop(hurry=hurry)
    waiter.cancel()
    stopper.cancel()
    return received[0] if received else None
