"""Python clients for the Segmenter service: blocking and asyncio.

    with SegmenterClient("127.0.0.1:50051") as client:
        for response in client.stream(["Hello wor", "ld. How are", " you?"], top_k=3):
            ...
        print(client.segment("one whole text").segments)

Chunks are given as plain strings; the client numbers their offsets. To
continue a stream after a broken call, pass ``stream_id``, ``resume=True`` and
``start_offset`` = the processed_chars of the last response received, and send
the text from there: the server rewinds to that point, so nothing is lost or
duplicated.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path

import grpc

from hmlstm.v1 import segmenter_pb2 as pb
from hmlstm.v1 import segmenter_pb2_grpc as pb_grpc


def _requests(chunks: Iterable[str], config: pb.StreamConfig, start_offset: int) -> Iterator[pb.SegmentRequest]:
    yield pb.SegmentRequest(config=config)
    offset = start_offset
    for text in chunks:
        yield pb.SegmentRequest(chunk=pb.TextChunk(offset=offset, text=text))
        offset += len(text)


async def _arequests(chunks, config: pb.StreamConfig, start_offset: int) -> AsyncIterator[pb.SegmentRequest]:
    yield pb.SegmentRequest(config=config)
    offset = start_offset
    if isinstance(chunks, AsyncIterable):
        async for text in chunks:
            yield pb.SegmentRequest(chunk=pb.TextChunk(offset=offset, text=text))
            offset += len(text)
    else:
        for text in chunks:
            yield pb.SegmentRequest(chunk=pb.TextChunk(offset=offset, text=text))
            offset += len(text)


def _credentials(root_cert: str | Path | None):
    if root_cert is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=Path(root_cert).read_bytes())


LB_POLICIES = ("pick_first", "round_robin")


def channel_options(server_name: str | None = None, lb_policy: str | None = None) -> list[tuple[str, str]]:
    """gRPC channel options. ``lb_policy="round_robin"`` spreads calls over every address the target
    resolves to (``dns:///hmlstm-headless.NAMESPACE.svc:50051``, or ``ipv4:10.0.0.1:50051,10.0.0.2:50051``),
    one subchannel each; gRPC's default, pick_first, sends every call over one connection."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if lb_policy:
        if lb_policy not in LB_POLICIES:
            raise ValueError(f"load-balancing policy {lb_policy!r}: use one of {', '.join(LB_POLICIES)}")
        options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{lb_policy: {}}]})))
    return options


def _metadata(token: str | None):
    return (("authorization", f"Bearer {token}"),) if token else None


def _config(layers, top_k, stream_id, resume, start_offset) -> pb.StreamConfig:
    return pb.StreamConfig(layers=list(layers), top_k=top_k, stream_id=stream_id, resume=resume,
                           resume_offset=start_offset if resume else 0)


class SegmenterClient:
    """Blocking client. ``target`` is host:port or any gRPC target (``dns:///name:port``); TLS if ``root_cert``
    is given; ``lb_policy="round_robin"`` spreads calls over every address the target resolves to."""

    def __init__(self, target: str, token: str | None = None, root_cert: str | Path | None = None,
                 timeout: float | None = None, server_name: str | None = None, lb_policy: str | None = None):
        creds = _credentials(root_cert)
        options = channel_options(server_name, lb_policy)
        self.channel = (grpc.secure_channel(target, creds, options) if creds
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.SegmenterStub(self.channel)
        self.metadata = _metadata(token)
        self.timeout = timeout

    def stream(self, chunks: Iterable[str], layers: Iterable[int] = (), top_k: int = 0, stream_id: str = "",
               resume: bool = False, start_offset: int = 0) -> Iterator[pb.SegmentResponse]:
        """Stream ``chunks``; returns the call, an iterator of responses (``.cancel()`` ends it)."""
        config = _config(layers, top_k, stream_id, resume, start_offset)
        return self.stub.StreamSegment(_requests(chunks, config, start_offset), metadata=self.metadata,
                                       timeout=self.timeout)

    def segment(self, text: str, layers: Iterable[int] = ()) -> pb.SegmentTextResponse:
        return self.stub.Segment(pb.SegmentTextRequest(text=text, layers=list(layers)), metadata=self.metadata,
                                 timeout=self.timeout)

    def describe(self) -> pb.ModelInfo:
        return self.stub.DescribeModel(pb.DescribeModelRequest(), metadata=self.metadata, timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SegmenterClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncSegmenterClient:
    """asyncio client; create and use it inside one event loop."""

    def __init__(self, target: str, token: str | None = None, root_cert: str | Path | None = None,
                 timeout: float | None = None, server_name: str | None = None, lb_policy: str | None = None):
        creds = _credentials(root_cert)
        options = channel_options(server_name, lb_policy)
        self.channel = (grpc.aio.secure_channel(target, creds, options) if creds
                        else grpc.aio.insecure_channel(target, options))
        self.stub = pb_grpc.SegmenterStub(self.channel)
        self.metadata = _metadata(token)
        self.timeout = timeout

    def stream(self, chunks, layers: Iterable[int] = (), top_k: int = 0, stream_id: str = "",
               resume: bool = False, start_offset: int = 0):
        """An async iterator of responses; ``chunks`` may be an iterable or an async iterable."""
        config = _config(layers, top_k, stream_id, resume, start_offset)
        return self.stub.StreamSegment(_arequests(chunks, config, start_offset), metadata=self.metadata,
                                       timeout=self.timeout)

    async def segment(self, text: str, layers: Iterable[int] = ()) -> pb.SegmentTextResponse:
        return await self.stub.Segment(pb.SegmentTextRequest(text=text, layers=list(layers)),
                                       metadata=self.metadata, timeout=self.timeout)

    async def describe(self) -> pb.ModelInfo:
        return await self.stub.DescribeModel(pb.DescribeModelRequest(), metadata=self.metadata,
                                             timeout=self.timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncSegmenterClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
