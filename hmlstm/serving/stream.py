"""One stream's state and the rules for its chunks; the registry of live streams.

No gRPC here. ``StreamState.accept`` checks a chunk against what was processed
and returns the part that is new; ``StreamState.apply`` takes the model's
row for that part (``batch.Row``) and returns what the client is told. The server wraps
these in rpc handlers; ``hmlstm segment --local`` calls them directly.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from hmlstm.serving.batch import Row
from hmlstm.serving.segments import MAX_SEGMENT_CHARS, SegmentTracker, Span


class StreamError(Exception):
    """A client mistake; ``code`` names the gRPC status (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class ChunkResult:
    chunk_offset: int
    processed_chars: int
    duplicate: bool = False
    boundaries: dict[int, list[int]] = field(default_factory=dict)
    segments: list[Span] = field(default_factory=list)
    next_chars: list[tuple[str, float]] = field(default_factory=list)
    unknown_chars: int = 0
    final: bool = False
    decided_chars: int = 0  # boundaries are known up to here (processed_chars less the model's look-ahead)


REPLAY_DEPTH = 32  # responses a live stream can rewind to (docs/protocol.md: "keeps its last 32 responses")


class StreamState:
    """Everything the server holds for one stream between chunks."""

    def __init__(self, state: dict[str, np.ndarray], layers: list[int], top_k: int, stream_id: str = "",
                 max_segment_chars: int = MAX_SEGMENT_CHARS, replay_depth: int = REPLAY_DEPTH,
                 alignment: dict[int, str] | None = None, lookahead: int = 0):
        self.state = state  # model state inputs, each [1, ...]; replaced, never changed in place
        self.layers = layers
        self.top_k = top_k
        self.stream_id = stream_id
        self.tracker = SegmentTracker(layers, max_segment_chars, alignment, lookahead)
        self.processed = 0
        self.attached = True
        self.last_seen = time.monotonic()
        # The call holding the stream (the server's handler task), an event set when it lets go,
        # and whether a newer call resumed the stream and took it over.
        self.owner = None
        self.context = None  # the attached call's grpc context (server only)
        self.released = None
        self.taken_over = False
        self.shut_down = ""  # set when the server ended the call at the end of its shutdown grace period: why
        # What the call holding the stream waits on ("read": the client's next message, "write": the
        # client to read a response, "" while the server works) and since when; the server's
        # watchdog ends a call that has waited longer than the idle timeout (``StreamRegistry.stalled``).
        self.waiting = ""
        self.waiting_since = time.monotonic()
        self.idle_expired = ""
        self._call_end: int | None = None  # end of the last chunk received on the current call
        # (processed, model state, tracker, text of the chunk that led here) after each of the
        # recent responses, to rewind a resume to and to persist.
        self._history: deque = deque(maxlen=replay_depth) if stream_id else deque(maxlen=1)
        self.pending: list[tuple[int, str]] = []  # chunks to re-run after loading from a store
        self.checkpoint()

    def checkpoint(self, text: str = "") -> None:
        """Remember the stream as it is after the response just built (for ``text``).

        A stream without an id cannot be resumed or stored, so only its first snapshot is kept.
        """
        if not self.stream_id and self._history:
            return
        self._history.append((self.processed, self.state, self.tracker.copy(), text))

    def compact(self) -> None:
        """Give the state, and every snapshot's, arrays of its own. A model call hands each stream views of the
        call's whole outputs (batch.read_rows), so a view keeps every row of that call alive; a stream held for
        a resume, whose snapshots may each come from another call, would keep up to ``replay_depth`` whole
        calls. Called when a held stream's call lets go: the copies cost once per call, not per message."""
        own: dict[int, dict] = {}  # the snapshots share state dicts with each other and with self.state

        def copied(state: dict) -> dict:
            if id(state) not in own:
                own[id(state)] = {k: np.array(v, np.float32) for k, v in state.items()}
            return own[id(state)]

        self.state = copied(self.state)
        hist = [(p, copied(state), tracker, text) for p, state, tracker, text in self._history]
        self._history.clear()
        self._history.extend(hist)

    def record(self, depth: int) -> bytes:
        """The persistent form: the snapshot ``depth`` responses back, and the chunks since."""
        from hmlstm.serving.store import encode_record

        hist = list(self._history)
        base = hist[max(0, len(hist) - 1 - depth)]
        texts = [(h[0] - len(h[3]), h[3]) for h in hist[hist.index(base) + 1 :]]
        return encode_record(self.layers, self.top_k, self.stream_id, base[0], base[1], base[2], texts)

    @classmethod
    def from_record(cls, record: bytes | dict, max_segment_chars: int = MAX_SEGMENT_CHARS) -> StreamState:
        """A stream at its record's base snapshot; ``pending`` holds the chunks to re-run.

        ``record``: the stored bytes, or what ``store.decode_record`` made of them.
        """
        from hmlstm.serving.store import decode_record

        r = decode_record(record) if isinstance(record, bytes) else record
        st = cls(r["state"], r["layers"], r["top_k"], r["stream_id"], max_segment_chars)
        st.processed, st.tracker = r["processed"], r["tracker"]
        st._history.clear()
        st.checkpoint()
        st.pending = r["texts"]
        st.attached = False
        return st

    def check_rewind(self, offset: int) -> None:
        """StreamError if the stream cannot go back to ``offset``; changes nothing either way."""
        ends = [h[0] for h in self._history]
        if offset not in ends:
            held = f"{ends[0]}..{ends[-1]}" if ends else "none"
            raise StreamError("OUT_OF_RANGE", f"cannot resume at offset {offset}: the stream's responses ended "
                              f"at other offsets or too long ago (held: {held}); resume_offset must be the "
                              "processed_chars of the last response received")

    def rewind(self, offset: int) -> None:
        """Go back to the state after the response that ended at ``offset``. A refused rewind changes nothing:
        the offsets its message names as held stay resumable."""
        self.check_rewind(offset)
        while self._history[-1][0] > offset:
            self._history.pop()
        self.processed, self.state, tracker, _ = self._history[-1]
        self.tracker = tracker.copy()

    def claim(self, owner, released) -> None:
        """The call now attached (its task, and an event to set when it lets go)."""
        self.owner, self.released, self.taken_over = owner, released, False
        self.idle_expired = ""

    def wait(self, what: str) -> None:
        """The call starts waiting for ``what`` ("read", "write") or stops waiting ("")."""
        self.waiting = what
        if what:  # only a wait is timed (the watchdog reads it while ``waiting`` is set): one clock read, not two
            self.waiting_since = time.monotonic()

    def attach(self) -> None:
        """A (new) call takes the stream over: offsets restart their ordering check."""
        self.attached = True
        self._call_end = None
        self.last_seen = time.monotonic()

    def accept(self, offset: int, text: str, max_chunk_chars: int) -> str:
        """Check a chunk; return the part not yet processed ("" for a pure resend)."""
        if not text:
            raise StreamError("INVALID_ARGUMENT", f"chunk at offset {offset} is empty; send at least one character")
        if len(text) > max_chunk_chars:
            raise StreamError("INVALID_ARGUMENT", f"chunk at offset {offset} has {len(text)} characters, over the "
                              f"limit of {max_chunk_chars}; split it into smaller chunks")
        if self._call_end is not None and offset < self._call_end:
            raise StreamError("INVALID_ARGUMENT", f"chunk offset {offset} goes backwards: the previous chunk on "
                              f"this call ended at {self._call_end}")
        if offset > self.processed:
            raise StreamError("OUT_OF_RANGE", f"chunk at offset {offset} leaves a gap: {self.processed} characters "
                              f"were processed, so the next chunk must start at {self.processed}")
        self._call_end = offset + len(text)
        self.last_seen = time.monotonic()
        return text[self.processed - offset :]

    def apply(self, chunk_offset: int, new_text: str, unknown: int, row: Row) -> ChunkResult:
        """Take the model's row for ``new_text`` (its steps' boundaries, next state and top-k)."""
        start = self.processed
        self.state = row.state
        boundaries, closed = self.tracker.feed_fired(start, new_text, row.fired)
        self.processed = start + len(new_text)
        return ChunkResult(chunk_offset, self.processed, False, boundaries, closed + self.tracker.open_spans(),
                           row.next_chars, unknown, decided_chars=self.tracker.decided)

    def duplicate(self, chunk_offset: int) -> ChunkResult:
        return ChunkResult(chunk_offset, self.processed, duplicate=True, decided_chars=self.tracker.decided)

    @property
    def padding(self) -> int:
        """Padding steps the end of the stream must run for the characters still undecided (0: none)."""
        return self.tracker.lookahead if self.tracker.undecided else 0

    def finish(self, row: Row | None = None) -> ChunkResult:
        """The final result. ``row``: the model's row for ``padding`` steps of spec.LOOKAHEAD_PAD_ID run from
        the stream's state, where look-ahead left characters undecided (the state they lead to is not kept:
        the stream ends, and a resume rewinds to a checkpoint)."""
        boundaries, segments = self.tracker.flush_fired(None if row is None else row.fired)
        return ChunkResult(self.processed, self.processed, boundaries=boundaries, segments=segments, final=True,
                           decided_chars=self.processed)


class StreamRegistry:
    """Streams by id, so a broken call can be resumed; a cap on concurrent streams."""

    def __init__(self, max_streams: int, idle_timeout_s: float):
        self.max_streams = max_streams
        self.idle_timeout_s = idle_timeout_s
        self._by_id: dict[str, StreamState] = {}
        self._attached: set[StreamState] = set()  # streams with a call attached, with an id or not

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def active(self) -> int:
        """Calls currently attached to a stream."""
        return len(self._attached)

    def open(self, make_state, stream_id: str, resume: bool, resume_offset: int = 0) -> StreamState:
        """Start or resume a stream for a new call; StreamError on any conflict."""
        if resume:
            if not stream_id:
                raise StreamError("INVALID_ARGUMENT", "resume needs the stream_id of the stream to continue")
            st = self._by_id.get(stream_id)
            if st is None:
                raise StreamError("NOT_FOUND", f"no stream {stream_id!r} to resume: never started, finished, or "
                                  f"idle longer than {self.idle_timeout_s:g}s; start a new stream")
            if st.attached:
                raise StreamError("ABORTED", f"stream {stream_id!r} is still attached to another call that "
                                  "did not let go; retry the resume shortly")
            self._check_capacity()
            st.rewind(resume_offset)
            st.attach()
            self._attached.add(st)
            return st
        if stream_id and stream_id in self._by_id:
            raise StreamError("ALREADY_EXISTS", f"stream {stream_id!r} exists; resume it (resume = true) or "
                              "choose another id")
        self._check_capacity()
        st = make_state()
        if stream_id:
            self._by_id[stream_id] = st
        self._attached.add(st)
        return st

    def held(self, stream_id: str) -> bool:
        return stream_id in self._by_id

    def get(self, stream_id: str) -> StreamState | None:
        return self._by_id.get(stream_id)

    def adopt(self, st: StreamState) -> None:
        """Hold a stream loaded from a state store (detached until a call opens it)."""
        self._by_id[st.stream_id] = st

    def _check_capacity(self) -> None:
        if self.active >= self.max_streams:
            raise StreamError("RESOURCE_EXHAUSTED", f"the server is at its limit of {self.max_streams} concurrent "
                              "streams; retry later")

    def detach(self, st: StreamState, finished: bool) -> None:
        """The call ended. A finished stream is forgotten; a broken one waits for a resume."""
        st.attached = False
        self._attached.discard(st)
        if not finished and st.stream_id:  # held for a resume: let go of the model calls' outputs
            st.compact()
        if st.released is not None:
            st.released.set()
        st.last_seen = time.monotonic()
        if finished and st.stream_id:
            self._by_id.pop(st.stream_id, None)

    def attached_streams(self) -> list[StreamState]:
        """Every stream a call is attached to now."""
        return list(self._attached)

    def stalled(self, now: float | None = None) -> list[StreamState]:
        """Attached streams whose call has waited on its client longer than the idle timeout."""
        now = time.monotonic() if now is None else now
        return [st for st in self._attached
                if st.waiting and now - st.waiting_since > self.idle_timeout_s]

    def expire(self, now: float | None = None) -> int:
        """Forget detached streams idle past the timeout; returns how many."""
        now = time.monotonic() if now is None else now
        stale = [k for k, st in self._by_id.items()
                 if not st.attached and now - st.last_seen > self.idle_timeout_s]
        for k in stale:
            del self._by_id[k]
        return len(stale)
