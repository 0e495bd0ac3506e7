"""Where stream state survives the server process: SQLite (one machine) or Redis (replicas).

In memory is the default and needs no store: the registry holds the streams.
With a store, the server saves each stream that has an id after every chunk,
and the response that acknowledges it waits for that save for a bounded time
(saver.py; SegmentResponse.durable says whether it made it); a server that does not
hold a stream (it restarted, or another replica served it) loads it from the
store when a client resumes. Entries expire after the idle timeout.

What is saved is a compact record, not a pickle: a JSON header and the raw
float32 state arrays. It holds a base snapshot (model state and segment
tracker) and the text of the chunks after it, so a server that loads it can
re-run those chunks and rewind to any response the client may have missed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from hmlstm.serving.segments import SegmentTracker

FORMAT = 1


class StoreUnavailable(Exception):
    """The store cannot be reached right now."""


class StateStore(Protocol):
    def save(self, stream_id: str, record: bytes, ttl_s: float) -> None: ...
    def load(self, stream_id: str) -> bytes | None: ...
    def delete(self, stream_id: str) -> None: ...
    def ping(self) -> None: ...  # StoreUnavailable unless the store answers
    def close(self) -> None: ...


# ------------------------------------------------------------------ record format


def encode_record(layers: list[int], top_k: int, stream_id: str, processed: int, state: dict[str, np.ndarray],
                  tracker: SegmentTracker, texts: list[tuple[int, str]]) -> bytes:
    arrays, payload, pos = [], [], 0
    for name, arr in state.items():
        data = np.ascontiguousarray(arr, np.float32).tobytes()
        arrays.append([name, list(arr.shape), pos, len(data)])
        payload.append(data)
        pos += len(data)
    header = {"format": FORMAT, "layers": layers, "top_k": top_k, "stream_id": stream_id, "processed": processed,
              "tracker": tracker.to_dict(), "texts": texts, "arrays": arrays}
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return len(head).to_bytes(4, "big") + head + b"".join(payload)


def decode_record(record: bytes) -> dict:
    n = int.from_bytes(record[:4], "big")
    header = json.loads(record[4 : 4 + n].decode("utf-8"))
    if header.get("format") != FORMAT:
        raise ValueError(f"stored stream record has format {header.get('format')}, expected {FORMAT}")
    body = memoryview(record)[4 + n :]
    header["state"] = {name: np.frombuffer(body[off : off + size], np.float32).reshape(shape).copy()
                       for name, shape, off, size in header.pop("arrays")}
    header["tracker"] = SegmentTracker.from_dict(header["tracker"])
    header["texts"] = [tuple(t) for t in header["texts"]]
    return header


# ------------------------------------------------------------------ backends


class SQLiteStore:
    """One file on local disk. WAL mode: a saved record survives the process being killed."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._local = threading.local()
        self._conn()  # fail early on a bad path

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=5, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("CREATE TABLE IF NOT EXISTS streams (id TEXT PRIMARY KEY, record BLOB, expires REAL)")
            except sqlite3.Error as e:
                raise StoreUnavailable(f"SQLite store {self.path}: {e}") from None
            self._local.conn = conn
        return conn

    def save(self, stream_id: str, record: bytes, ttl_s: float) -> None:
        try:
            self._conn().execute("INSERT OR REPLACE INTO streams VALUES (?, ?, ?)",
                                 (stream_id, record, time.time() + ttl_s))
        except sqlite3.Error as e:
            raise StoreUnavailable(str(e)) from None

    def load(self, stream_id: str) -> bytes | None:
        try:
            row = self._conn().execute("SELECT record, expires FROM streams WHERE id = ?", (stream_id,)).fetchone()
        except sqlite3.Error as e:
            raise StoreUnavailable(str(e)) from None
        if row is None or row[1] < time.time():
            return None
        return bytes(row[0])

    def delete(self, stream_id: str) -> None:
        try:
            conn = self._conn()
            conn.execute("DELETE FROM streams WHERE id = ?", (stream_id,))
            conn.execute("DELETE FROM streams WHERE expires < ?", (time.time(),))
        except sqlite3.Error as e:
            raise StoreUnavailable(str(e)) from None

    def ping(self) -> None:
        try:
            self._conn().execute("SELECT 1").fetchone()
        except sqlite3.Error as e:
            raise StoreUnavailable(str(e)) from None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class RedisStore:
    """Redis shared by several replicas: any replica can resume any stream."""

    PREFIX = "hmlstm:stream:"

    def __init__(self, url: str, timeout_s: float = 2.0):
        import redis

        self.url = url
        # A socket timeout bounds how long a thread waits on a Redis that hangs (paused, partitioned);
        # the server's responses wait far less (saver.py), so this only frees the thread.
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._errors = (redis.RedisError, OSError)

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except self._errors as e:
            raise StoreUnavailable(f"Redis {self.url}: {e}") from None

    def save(self, stream_id: str, record: bytes, ttl_s: float) -> None:
        self._call(self._redis.set, self.PREFIX + stream_id, record, px=max(1, int(ttl_s * 1000)))

    def load(self, stream_id: str) -> bytes | None:
        return self._call(self._redis.get, self.PREFIX + stream_id)

    def delete(self, stream_id: str) -> None:
        self._call(self._redis.delete, self.PREFIX + stream_id)

    def ping(self) -> None:
        self._call(self._redis.ping)

    def close(self) -> None:
        self._redis.close()


def open_store(spec: str | None, timeout_s: float = 2.0) -> StateStore | None:
    """"memory" or None -> None (the registry alone); "sqlite:PATH"; "redis://HOST:PORT/DB".
    ``timeout_s``: the longest a Redis call may block its thread."""
    if spec in (None, "", "memory"):
        return None
    if spec.startswith("sqlite:"):
        path = spec[len("sqlite:") :]
        if not path.strip() or path == ":memory:":  # SQLite would keep it in this process only: nothing durable
            raise ValueError(f"--state-store {spec}: name the database file, e.g. sqlite:/var/lib/hmlstm/streams.db "
                             "(an in-memory SQLite database would make nothing durable; --state-store memory is that)")
        file = Path(path)
        if file.is_dir():
            raise ValueError(f"--state-store {spec}: {path} is a folder; name the database file in it")
        if file.exists() and not file.is_file():  # SQLite would leave its journal beside a device
            raise ValueError(f"--state-store {spec}: {path} is not a regular file (a device, a pipe or a socket); "
                             "name the database file")
        if not file.parent.is_dir():  # (SQLite says only "unable to open database file")
            raise ValueError(f"--state-store {spec}: its folder {file.parent} does not exist; create it first")
        return SQLiteStore(path)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from urllib.parse import urlsplit

        try:  # a port out of range: redis-py's OverflowError at the first call, naming nothing
            if (port := urlsplit(spec).port) is not None and port < 1:
                raise ValueError(f"Port out of range 1-65535, got {port}")
        except ValueError as e:
            raise ValueError(f"--state-store {spec}: {e}") from None
        return RedisStore(spec, timeout_s)
    raise ValueError(f"unknown state store {spec!r}; use memory, sqlite:PATH or redis://HOST:PORT/DB")
