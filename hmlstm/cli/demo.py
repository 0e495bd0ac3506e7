"""`hmlstm demo`: start a server with the shipped model, stream a text through it, print what it found."""

from __future__ import annotations

import sys
import time

from hmlstm.cli.common import _held_out_quality, _load_model
from hmlstm.errors import UserError

DEMO_TEXT = (
    "The for statement is used to iterate over the elements of a sequence (such as a string, tuple or "
    "list) or other iterable object. The expression list is evaluated once; it should yield an iterable "
    "object. An iterator is created for the result of that iterable."
)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="start a server, stream a built-in text through it, print the segments",
                       description="Start a gRPC server on a free loopback port with the shipped model (or "
                       "--model), stream a paragraph of Python's documentation through it in chunks, and print "
                       "the boundaries each layer found as they come, then what the model card says they are worth.")
    p.add_argument("--model", default=None, help="an .onnx file (default: the shipped model)")
    p.add_argument("--chunk-chars", type=int, default=24, help="characters per chunk the demo streams")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import json
    import textwrap

    from hmlstm.serving.background import BackgroundServer
    from hmlstm.serving.client import SegmenterClient
    from hmlstm.serving.config import ServeConfig
    from hmlstm.serving.render import Marker, cut_original, legend
    from hmlstm.serving.segments import cut

    if args.chunk_chars < 1:
        raise UserError(f"--chunk-chars must be at least 1, got {args.chunk_chars}")
    model = _load_model(args.model, "auto")
    config = ServeConfig(port=0, metrics_port=None)
    with BackgroundServer(model, config) as srv:
        print(f"server on {srv.target}: {model.path.name}, {model.runtime.note}")
        with SegmenterClient(srv.target) as client:
            info = client.describe()
            prov = json.loads(info.provenance_json or "{}")
            print(f"model: {info.num_layers} layers x {list(info.units)} units, vocabulary {info.vocab_size}, "
                  f"trained on {prov.get('corpus', '?')} (validation BPC {prov.get('val_bpc', '?')})")
            layers = list(info.boundary_layers)
            marker = Marker(dict(zip(info.boundary_layers, info.boundary_alignment)))
            text = DEMO_TEXT
            strip = info.trained_without
            if strip:  # the model reads text without delimiters: send it so
                text = "".join(ch for ch in DEMO_TEXT if ch not in strip)
                print(f"the model was trained on text without {strip!r}: streaming the text with them removed")
            print(f"streaming {len(text)} characters in chunks of {args.chunk_chars}   [{legend(layers)}]\n")
            chunks = [text[i : i + args.chunk_chars] for i in range(0, len(text), args.chunk_chars)]
            t0 = time.perf_counter()
            segments: dict[int, list[str]] = {l: [] for l in layers}
            cuts: dict[int, list[int]] = {l: [] for l in layers}
            printed = 0  # with look-ahead, a response's boundaries reach only to its decided_chars
            for r in client.stream(chunks, layers=layers, top_k=3):
                b = {lb.layer: list(lb.offsets) for lb in r.boundaries}
                for l, offsets in b.items():
                    cuts[l].extend(cut(o, marker.alignment.get(l, "end")) for o in offsets)
                upto = r.decided_chars if info.lookahead_chars and not r.final else r.processed_chars
                sys.stdout.write(marker.feed(text[printed:upto], printed, b))
                sys.stdout.flush()
                printed = max(printed, upto)
                for s in r.segments:
                    if s.final:
                        segments[s.layer].append(s.text)
            sys.stdout.write(marker.close())
            elapsed = time.perf_counter() - t0
    print(f"\n\n{len(text)} characters in {elapsed * 1e3:.0f} ms over gRPC. Each layer's segments, cut in the "
          "original text:")
    kept = [i for i, ch in enumerate(DEMO_TEXT) if ch not in (strip or "")]
    quality = _held_out_quality(model.path)
    for l in layers:
        seg = segments[l]
        mean = sum(map(len, seg)) / max(1, len(seg))
        print(f"\nlayer {l}: {len(seg)} segments, mean {mean:.1f} characters")
        print(textwrap.fill(cut_original(DEMO_TEXT, kept, cuts[l]), width=100, initial_indent="    ",
                            subsequent_indent="    "))
        for line in quality.get(l, []):
            print(f"  {line}")
    return 0
