"""`hmlstm segment`: stream a file to a server (or run the model here) and print its segments live."""

from __future__ import annotations

import bisect
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from hmlstm.cli.common import _layer_list, _load_model, connection_reason
from hmlstm.errors import ServiceError, UserError


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="stream a file or stdin to a server and print its segments live",
                       description="Stream a UTF-8 file (or - for standard input) to `hmlstm serve` in chunks, or "
                       "run the model here with --local, and print the text as read with each layer's boundary "
                       "marks between its characters (--jsonl: each closed segment as a JSON line). Against a "
                       "server the stream has an id, and a server that goes away is resumed where it can be.")
    p.add_argument("file", help="a UTF-8 text file, or - for standard input")
    p.add_argument("--server", default=None, help="host:port of `hmlstm serve` (default 127.0.0.1:50051), or any "
                   "gRPC target: dns:///hmlstm-headless.NAMESPACE.svc:50051 names every replica")
    p.add_argument("--lb", default=None, choices=["pick_first", "round_robin"],
                   help="how calls spread over the addresses --server resolves to: round_robin balances them over "
                        "every replica (a headless Service); default pick_first (one connection)")
    p.add_argument("--local", action="store_true", help="run the model in this process; no server")
    p.add_argument("--model", default=None, help="with --local: an .onnx file (default: the shipped model)")
    p.add_argument("--chunk-chars", type=int, default=64,
                   help=f"characters per chunk sent, 1-{MAX_CHUNK_CHARS:,} (and at most the server's limit)")
    p.add_argument("--layers", type=_layer_list, default=[], metavar="L1,L2",
                   help="comma-separated boundary layers to report, e.g. --layers 1,2 (default: all)")
    p.add_argument("--jsonl", action="store_true", help="print closed segments as JSON lines instead")
    p.add_argument("--marks", default=None, metavar="CHARS",
                   help="the marks of layers 1, 2, 3... one character each, e.g. --marks '/#@' (default: | ‖ ⦀): "
                        "choose ones the text does not contain, so that every mark is a boundary")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token-env", default=None, metavar="VAR", help="bearer token from this variable")
    token.add_argument("--token-file", default=None, metavar="FILE",
                       help="bearer token: the file's first line (as `serve --auth-token-file` reads it)")
    p.add_argument("--tls-ca", default=None, help="PEM root certificate: connect with TLS")
    p.add_argument("--keep-delimiters", action="store_true",
                   help="send the text as is, even the characters the model was trained without "
                        "(by default they are removed before sending, and a note says so)")
    p.set_defaults(func=cmd_segment)


def _check_utf8(path: Path, block: int = 1 << 20) -> None:
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    done = 0  # bytes read so far
    try:
        with path.open("rb") as f:
            while raw := f.read(block):
                done += len(raw)
                decoder.decode(raw)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise not_utf8(path, done, e) from None


def not_utf8(name, done: int, e: UnicodeDecodeError) -> UserError:
    """The error for input that is not UTF-8, saying where and what to do. ``done``: bytes read, the block that
    failed included; the decoder saw that block after the bytes of a character begun before it (``e.object``)."""
    offset = done - len(e.object) + e.start
    return UserError(f"{name} is not UTF-8 text (bad byte at offset {offset:,}); convert it, e.g. "
                     "iconv -f latin1 -t utf-8")


MAX_CHUNK_CHARS = 1 << 20  # a chunk is held whole in memory, and sent as one message


def _read_chunks(path: str, size: int):
    """Check the source now (before anything connects); return a generator of its text in pieces, its line
    ends read as Python reads text (CRLF and a lone CR as LF), as `evaluate` and `train` read a file."""
    import codecs

    if not 1 <= size <= MAX_CHUNK_CHARS:
        raise UserError(f"--chunk-chars must be 1-{MAX_CHUNK_CHARS:,}, got {size:,}")
    if path != "-":
        p = Path(path)
        if not p.exists():
            raise UserError(f"{path} does not exist")
        if p.is_dir():
            raise UserError(f"{path} is a folder; name a text file")
        if not p.is_file():
            raise UserError(f"{path} is not a regular file (a pipe or a device, which cannot be checked before "
                            f"sending): send it through standard input, `hmlstm segment - < {path}`")
        _check_utf8(p)  # a file can be checked whole before anything is sent; standard input cannot
    name = "standard input" if path == "-" else path

    def pieces():
        # Bytes from the file descriptor itself, decoded strictly: a non-UTF-8 input is one clean error, never
        # a surrogate printed later; and no buffered reader whose lock a dying process could be left holding
        # (sys.stdin read from gRPC's request thread aborted the interpreter at exit).
        fd = 0 if path == "-" else os.open(path, os.O_RDONLY)
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        pending, done = "", 0
        try:
            while True:
                raw = os.read(fd, size)
                done += len(raw)
                pending += decoder.decode(raw, final=not raw)
                held = "\r" if raw and pending.endswith("\r") else ""  # a CR whose LF may be in the next read
                pending = pending[: len(pending) - len(held)].replace("\r\n", "\n").replace("\r", "\n")
                while len(pending) >= size or (not raw and pending):
                    yield pending[:size]
                    pending = pending[size:]
                pending += held
                if not raw:
                    return
        except UnicodeDecodeError as e:
            raise not_utf8(name, done, e) from None
        finally:
            if fd != 0:
                os.close(fd)

    return pieces()


class _Original:
    """The text as read and the text as sent (less the characters the model was trained without), with where
    each sent character stands in the original: what `segment` prints, its line breaks and delimiters kept."""

    def __init__(self, strip: str):
        self.table = str.maketrans("", "", strip)
        self.strip = set(strip)
        self.chunks: list[str] = []  # the original text as read
        self.starts: list[int] = []  # where each chunk starts in it
        self.kept: list[int] = []  # sent index -> original index
        self.length = 0
        self.shown = 0  # original characters printed so far

    def add(self, chunk: str) -> str:
        self.starts.append(self.length)
        self.chunks.append(chunk)
        self.kept.extend(self.length + i for i, ch in enumerate(chunk) if ch not in self.strip)
        self.length += len(chunk)
        return chunk.translate(self.table)

    def slice(self, a: int, b: int) -> str:
        """Original characters [a, b), joining only the chunks they lie in."""
        if a >= b:
            return ""
        i = bisect.bisect_right(self.starts, a) - 1
        j = bisect.bisect_left(self.starts, b)
        return "".join(self.chunks[i:j])[a - self.starts[i] : b - self.starts[i]]

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Sent characters [start, end) -> the original [first, last + 1)."""
        return self.kept[start], self.kept[end - 1] + 1


def _print_result(r, orig: _Original, jsonl: bool, printed: int, marker, lookahead: int = 0) -> int:
    """Print what ``r`` adds, in the original text; returns the sent characters printed. With look-ahead,
    only the characters whose boundaries are decided (``r.decided_chars``) are printed until the end."""
    import json

    if jsonl:
        for s in r.segments:
            if s.final and s.end > s.start:
                a, b = orig.span(s.start, s.end)
                print(json.dumps({"layer": s.layer, "start": a, "end": b, "text": orig.slice(a, b),
                                  "sent_start": s.start, "sent_end": s.end, "sent_text": s.text},
                                 ensure_ascii=False), flush=True)
        return r.processed_chars
    upto = r.decided_chars if lookahead and not r.final else r.processed_chars
    marks = marker.marks(max(0, upto - printed), printed, {lb.layer: list(lb.offsets) for lb in r.boundaries})
    if upto > printed:
        lo = orig.shown
        text, out = orig.slice(lo, orig.kept[upto - 1] + 1), []  # only what this response prints
        for i, m in enumerate(marks):
            at = orig.kept[printed + i]
            out += [text[orig.shown - lo : at - lo], m, text[at - lo]]  # the delimiters before it, its mark, it
            orig.shown = at + 1
        sys.stdout.write("".join(out))
    if r.final:
        sys.stdout.write(orig.slice(orig.shown, orig.length) + marker.close())
        orig.shown = orig.length
    sys.stdout.flush()
    return max(printed, upto)


def _note_stripping(chars: str, keep: bool) -> str:
    """What is removed before sending ("" when nothing), said once on stderr."""
    if not chars or keep:
        return ""
    print(f"[the model was trained on text without {chars!r}: removing them before sending (the output shows the "
          "text as read); --keep-delimiters sends the text as is]", file=sys.stderr)
    return chars


def _check_segment_flags(args) -> None:
    """Flags that conflict, or that this way of running would ignore, are refused by name."""
    if args.local:
        for flag, value in (("--server", args.server), ("--token-env", args.token_env), ("--tls-ca", args.tls_ca),
                            ("--lb", args.lb), ("--token-file", args.token_file)):
            if value is not None:
                raise UserError(f"{flag} and --local: --local runs the model in this process, with no server; "
                                "give one of them")
        return
    if args.model is not None:
        raise UserError("--model works only with --local (a server serves its own model); add --local or drop --model")
    if args.tls_ca is not None:
        from hmlstm.cli.common import check_root_certificate

        check_root_certificate(args.tls_ca, "--tls-ca")
    if args.token_env is not None and not os.environ.get(args.token_env):
        raise UserError(f"--token-env {args.token_env}: that environment variable is empty or unset")
    if args.token_file is not None:
        from hmlstm.cli.common import read_token_file

        args.token = read_token_file(args.token_file, "--token-file")
    else:
        args.token = os.environ.get(args.token_env) if args.token_env else None
    from hmlstm.cli.common import check_server

    args.server = "127.0.0.1:50051" if args.server is None else args.server
    check_server(args.server, "--server")


RESUME_TRIES = 5  # resumes in a row with no response between them, before `segment` gives up


class _Sent:
    """The text sent to the server, from the last offset it acknowledged on: a resumed call sends it again.
    One thread reads the source (a file or standard input) into it, at most ``ahead`` characters past what
    the server acknowledged; each call in turn reads from it, so a call that broke leaves nothing
    half-consumed."""

    def __init__(self, source, ahead: int = 1 << 20):
        self._cond = threading.Condition()
        self._chunks: list[tuple[int, str]] = []  # (offset, text), from the first one not acknowledged
        self._end = self._acked = 0  # the offset after the last chunk read; all before _acked is acknowledged
        self._done = False
        self._ahead = ahead
        threading.Thread(target=self._read, args=(source,), daemon=True, name="segment-reader").start()

    def _read(self, source) -> None:
        try:
            for text in source:
                with self._cond:
                    self._cond.wait_for(lambda: self._end - self._acked < self._ahead)
                    self._chunks.append((self._end, text))
                    self._end += len(text)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def texts(self, start: int):
        """The chunks from offset ``start`` (a chunk's start: a response boundary), waiting for the reader."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda s=start: self._done or self._end > s)
                pending = [t for o, t in self._chunks if o >= start]
                finished = self._done
            for text in pending:
                yield text
                start += len(text)
            if finished and not pending:
                return

    def ack(self, offset: int) -> None:
        """The server acknowledged everything before ``offset``: those chunks need never be sent again."""
        with self._cond:
            self._acked = max(self._acked, offset)
            while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= offset:
                self._chunks.pop(0)
            self._cond.notify_all()


def _layers_to_report(asked: list[int], available: list[int]) -> list[int]:
    """The layers asked for (all the model's by default), refused by name before anything is printed."""
    if not available:
        print("hmlstm: warning: this model has no boundary detector (trained with one layer and no "
              "--top-boundary?): it reports no boundaries, and the text comes back unmarked", file=sys.stderr)
    layers = sorted(set(asked)) or list(available)
    bad = [l for l in layers if l not in available]
    if bad:
        raise UserError(f"--layers {','.join(map(str, bad))}: this model reports boundaries on layer(s) "
                        f"{','.join(map(str, available)) or 'none'}")
    return layers


def _marks(chars: str | None) -> dict[int, str]:
    if chars is None:
        return {}
    if not chars or len(set(chars)) != len(chars) or any(c.isspace() for c in chars):
        raise UserError(f"--marks takes one distinct, visible character per layer, e.g. --marks '/#@'; got {chars!r}")
    return {i + 1: c for i, c in enumerate(chars)}


def cmd_segment(args) -> int:
    try:
        return _segment(args)
    except KeyboardInterrupt:
        if sys.stdout.isatty():  # "interrupted" starts a line of its own, not the end of the text's last one
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise


def _segment(args) -> int:
    from hmlstm.serving.render import Marker, legend

    _check_segment_flags(args)
    marks = _marks(args.marks)
    chunks = _read_chunks(args.file, args.chunk_chars)
    orig = _Original("")
    failed: list[UserError] = []

    def tee():
        # A mistake found while reading (a non-UTF-8 byte) ends the request stream cleanly and is
        # reported after it, instead of surfacing as the server's "Exception iterating requests".
        from hmlstm.serving.render import MARKS

        shown = {v: k for k, v in {**MARKS, **marks}.items()}  # mark -> layer
        warned = args.jsonl  # JSON lines carry offsets, not marks
        try:
            for c in chunks:
                if not warned and (clash := sorted(set(c) & set(shown))):
                    warned = True
                    print(f"hmlstm: warning: the text contains {clash[0]!r}, which is also layer {shown[clash[0]]}'s "
                          "mark: choose marks it lacks with --marks (e.g. --marks '/#@'), or use --jsonl",
                          file=sys.stderr)
                sent = orig.add(c)
                if sent:  # a chunk of delimiters only sends nothing
                    yield sent
        except UserError as e:
            failed.append(e)

    unknown = [0]  # characters the model's vocabulary lacks, as the responses count them

    def done() -> int:
        if failed:
            raise failed[0]
        sent_chars = len(orig.kept)
        if sent_chars and unknown[0] > 0.05 * sent_chars:
            print(f"hmlstm: warning: {unknown[0]:,} of {sent_chars:,} characters ({unknown[0] / sent_chars:.0%}) are "
                  "outside the model's vocabulary and were read as unknown: its boundaries on this text mean little",
                  file=sys.stderr)
        if not orig.kept:
            name = args.file if args.file != "-" else "standard input"
            what = ("is empty" if not orig.length else "contains only whitespace" if not orig.slice(
                0, orig.length).strip() else "holds only characters the model was trained without")
            print(f"0 characters sent: {name} {what}", file=sys.stderr)
        elif not args.jsonl and sys.stdout.isatty() and orig.slice(orig.length - 1, orig.length) != "\n":
            print()  # for the prompt's sake on a terminal; a file or a pipe gets only the text's own line ends
        return 0

    printed = 0
    if args.local:
        from hmlstm.serving.messages import response_pb
        from hmlstm.serving.runner import finish_sync, process_chunk_sync
        from hmlstm.serving.stream import StreamState

        model = _load_model(args.model, "auto")
        orig = _Original(_note_stripping(model.provenance.get("strip_delimiters") or "", args.keep_delimiters))
        layers = _layers_to_report(args.layers, model.boundary_layers)
        if not args.jsonl and layers:
            print(f"[{legend(layers, marks)}]", file=sys.stderr)
        st = StreamState(model.zero_state(1), layers, 0, alignment=model.alignment, lookahead=model.lookahead)
        marker = Marker(model.alignment, marks)
        for c in tee():
            r = response_pb(process_chunk_sync(model, st, st.processed, c, 4096))
            unknown[0] += r.unknown_chars
            printed = _print_result(r, orig, args.jsonl, printed, marker, model.lookahead)
        _print_result(response_pb(finish_sync(model, st)), orig, args.jsonl, printed, marker, model.lookahead)
        return done()

    import grpc

    from hmlstm.serving.client import SegmenterClient

    with SegmenterClient(args.server, token=args.token, root_cert=args.tls_ca, lb_policy=args.lb) as client:
        try:
            info = client.describe()
            if info.max_chunk_chars and args.chunk_chars > info.max_chunk_chars:
                raise UserError(f"--chunk-chars {args.chunk_chars:,} is over the server's limit of "
                                f"{info.max_chunk_chars:,} characters per chunk; send at most that")
            layers = _layers_to_report(args.layers, list(info.boundary_layers))
            orig = _Original(_note_stripping(info.trained_without, args.keep_delimiters))
            marker = Marker(dict(zip(info.boundary_layers, info.boundary_alignment)), marks)
            if not args.jsonl and layers:
                print(f"[{legend(layers, marks)}]", file=sys.stderr)
            sent = _Sent(tee(), ahead=max(1 << 20, 4 * args.chunk_chars))
            stream_id = f"segment-{uuid.uuid4().hex[:16]}"
            acked, resumable, tries = 0, False, 0
            while True:
                call = client.stream(sent.texts(acked), layers=layers, stream_id=stream_id, resume=acked > 0,
                                     start_offset=acked)
                try:
                    for r in call:
                        unknown[0] += r.unknown_chars
                        printed = _print_result(r, orig, args.jsonl, printed, marker, info.lookahead_chars)
                        acked, resumable, tries = r.processed_chars, r.durable, 0
                        sent.ack(acked)
                    break
                except grpc.RpcError as e:
                    said = "can be resumed by its id" in (e.details() or "")
                    if e.code() != grpc.StatusCode.UNAVAILABLE or not (resumable or said) or tries >= RESUME_TRIES \
                            or failed:
                        raise
                    tries += 1
                    print(f"[the server went away ({(e.details() or '').splitlines()[0][:120]}); resuming stream "
                          f"{stream_id} at character {acked:,}, try {tries} of {RESUME_TRIES}]", file=sys.stderr)
                    time.sleep(min(4.0, 0.5 * 2 ** (tries - 1)))
                finally:
                    call.cancel()
        except grpc.RpcError as e:
            if failed:
                raise failed[0] from None
            details = (e.details() or "").replace("\n", " ")
            reason = connection_reason(details, args.tls_ca is not None) if e.code() in (
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN) else ""
            mistake = e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                   grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
                                   grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED)
            raise (UserError if mistake else ServiceError)(
                f"server {args.server}: {e.code().name}: {reason or details}") from None
    return done()
