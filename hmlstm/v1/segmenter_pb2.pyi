from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SegmentRequest(_message.Message):
    __slots__ = ("config", "chunk")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    chunk: TextChunk
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., chunk: _Optional[_Union[TextChunk, _Mapping]] = ...) -> None: ...

class StreamConfig(_message.Message):
    __slots__ = ("layers", "top_k", "stream_id", "resume", "resume_offset")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    RESUME_OFFSET_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    stream_id: str
    resume: bool
    resume_offset: int
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., stream_id: _Optional[str] = ..., resume: _Optional[bool] = ..., resume_offset: _Optional[int] = ...) -> None: ...

class TextChunk(_message.Message):
    __slots__ = ("offset", "text")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    offset: int
    text: str
    def __init__(self, offset: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("chunk_offset", "processed_chars", "duplicate", "boundaries", "segments", "next_chars", "unknown_chars", "final", "durable", "decided_chars")
    CHUNK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_CHARS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CHARS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    DECIDED_CHARS_FIELD_NUMBER: _ClassVar[int]
    chunk_offset: int
    processed_chars: int
    duplicate: bool
    boundaries: _containers.RepeatedCompositeFieldContainer[LayerBoundaries]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    next_chars: _containers.RepeatedCompositeFieldContainer[CharProbability]
    unknown_chars: int
    final: bool
    durable: bool
    decided_chars: int
    def __init__(self, chunk_offset: _Optional[int] = ..., processed_chars: _Optional[int] = ..., duplicate: _Optional[bool] = ..., boundaries: _Optional[_Iterable[_Union[LayerBoundaries, _Mapping]]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., next_chars: _Optional[_Iterable[_Union[CharProbability, _Mapping]]] = ..., unknown_chars: _Optional[int] = ..., final: _Optional[bool] = ..., durable: _Optional[bool] = ..., decided_chars: _Optional[int] = ...) -> None: ...

class LayerBoundaries(_message.Message):
    __slots__ = ("layer", "offsets")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("layer", "start", "end", "text", "final")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    layer: int
    start: int
    end: int
    text: str
    final: bool
    def __init__(self, layer: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., text: _Optional[str] = ..., final: _Optional[bool] = ...) -> None: ...

class CharProbability(_message.Message):
    __slots__ = ("char", "probability")
    CHAR_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    char: str
    probability: float
    def __init__(self, char: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class SegmentTextRequest(_message.Message):
    __slots__ = ("text", "layers")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    text: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ...) -> None: ...

class SegmentTextResponse(_message.Message):
    __slots__ = ("boundaries", "segments", "unknown_chars", "chars")
    BOUNDARIES_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_CHARS_FIELD_NUMBER: _ClassVar[int]
    CHARS_FIELD_NUMBER: _ClassVar[int]
    boundaries: _containers.RepeatedCompositeFieldContainer[LayerBoundaries]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    unknown_chars: int
    chars: int
    def __init__(self, boundaries: _Optional[_Iterable[_Union[LayerBoundaries, _Mapping]]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., unknown_chars: _Optional[int] = ..., chars: _Optional[int] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("format", "num_layers", "units", "vocab_size", "top_boundary", "boundary_layers", "providers", "model_path", "model_config_json", "provenance_json", "max_chunk_chars", "max_text_chars", "trained_without", "boundary_alignment", "worker", "worker_pid", "lookahead_chars")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_WITHOUT_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_CHARS_FIELD_NUMBER: _ClassVar[int]
    format: str
    num_layers: int
    units: _containers.RepeatedScalarFieldContainer[int]
    vocab_size: int
    top_boundary: bool
    boundary_layers: _containers.RepeatedScalarFieldContainer[int]
    providers: _containers.RepeatedScalarFieldContainer[str]
    model_path: str
    model_config_json: str
    provenance_json: str
    max_chunk_chars: int
    max_text_chars: int
    trained_without: str
    boundary_alignment: _containers.RepeatedScalarFieldContainer[str]
    worker: int
    worker_pid: int
    lookahead_chars: int
    def __init__(self, format: _Optional[str] = ..., num_layers: _Optional[int] = ..., units: _Optional[_Iterable[int]] = ..., vocab_size: _Optional[int] = ..., top_boundary: _Optional[bool] = ..., boundary_layers: _Optional[_Iterable[int]] = ..., providers: _Optional[_Iterable[str]] = ..., model_path: _Optional[str] = ..., model_config_json: _Optional[str] = ..., provenance_json: _Optional[str] = ..., max_chunk_chars: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., trained_without: _Optional[str] = ..., boundary_alignment: _Optional[_Iterable[str]] = ..., worker: _Optional[int] = ..., worker_pid: _Optional[int] = ..., lookahead_chars: _Optional[int] = ...) -> None: ...
