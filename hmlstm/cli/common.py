"""What several commands share: quiet TensorFlow, flag parsers, loading a model or its vocabulary."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hmlstm.errors import UserError


def quiet_tensorflow():
    """Import TensorFlow without the C++ log lines it prints on CPU-only machines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)
    tf.get_logger().setLevel("ERROR")
    return tf


def need(*modules: str) -> None:
    """ModuleNotFoundError now, before any other check, for a module of the [train] extra that this install
    lacks (the entry point turns it into one line naming the extra); nothing is imported."""
    import importlib.util

    for name in modules:
        try:
            absent = name in sys.modules and sys.modules[name] is None or importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            absent = True
        if absent:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def check_output(path: Path, flag: str, folder: bool = False) -> None:
    """Refuse, before any work, an output that could not be written: a file where a folder is meant (or
    the other way round), a device or pipe that the output would replace, or a place where nothing can be
    created (/proc, a read-only mount). A folder
    (``folder=True``) may not exist yet (it is created with its parents); a file's folder must exist.
    Writability is tried, not guessed: root passes os.access() even where the kernel refuses a file."""
    import tempfile

    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder")
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name, such as {path / 'out'}")
    if not folder and path.exists() and not path.is_file():  # written beside and renamed over: /dev/null replaced
        raise UserError(f"{flag} {path} is not a regular file (a device, a pipe or a socket), and the output would "
                        "replace it; give a file name")
    place = path if folder else (path.parent if str(path.parent) else Path("."))
    if not folder and not place.is_dir():
        raise UserError(f"{flag} {path}: its folder {place} does not exist; create it first")
    while not place.exists():  # a folder to be made: its nearest existing ancestor must take it
        place = place.parent
    if not place.is_dir():
        raise UserError(f"{flag} {path}: {place} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hmlstm-probe-", dir=place))
    except OSError as e:
        raise UserError(f"{flag} {path}: nothing can be written in {place} ({e.strerror or e})") from None


def check_server(target: str, flag: str) -> None:
    """UserError unless ``target`` is host:port (or a gRPC target such as dns:///name:port) with a port 1-65535:
    gRPC would take an empty one or port 99999 and fail each call with a reason that names neither."""
    if not target.strip():
        raise UserError(f"{flag} is empty; give host:port, or leave it out for 127.0.0.1:50051")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"{flag} {target}: give host:port with a port 1-65535")


def read_token_file(path: str, flag: str) -> str:
    """A bearer token: the file's first line, stripped (a mounted Kubernetes Secret)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    token = (text.splitlines() or [""])[0].strip()
    if not token:
        raise UserError(f"{flag} {path}: the file " + ("is empty" if not text else
                        "contains only whitespace" if not text.strip() else "starts with an empty line"))
    return token


def check_root_certificate(path: str, flag: str) -> None:
    """UserError unless ``path`` holds PEM certificates a TLS client can verify a server with (gRPC would
    otherwise fail each call's handshake with a reason that names neither the flag nor the file)."""
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except (ssl.SSLError, ValueError):  # (SSLError is an OSError: first)
        raise UserError(f"{flag} {path}: not a PEM certificate (a file with -----BEGIN CERTIFICATE----- "
                        "blocks: the server's certificate, or the CA that signed it)") from None
    except OSError as e:  # a folder, no permission
        raise UserError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None


def connection_reason(details: str, tls: bool) -> str:
    """Why a call could not reach a server, in words, from gRPC's status details: an untrusted certificate, a
    name the certificate does not carry, TLS on one side only, nothing listening, a name that does not
    resolve; the TLS hint only where TLS may be the reason. "" where none of these is it."""
    low = details.lower()
    if tls and ("certificate_verify_failed" in low or "certificate verify failed" in low):
        return ("the server's TLS certificate is not trusted: it is not signed by the CA given (--tls-ca), or by "
                "the system's roots when none is given (a self-signed certificate needs --tls-ca naming itself)")
    if tls and ("peer name" in low or "hostname" in low or "subject alternative name" in low or "san " in low):
        return ("the server's TLS certificate does not carry the name connected to: connect by a name it "
                "carries, or give that name (--server-name / $HMLSTM_TLS_SERVER_NAME)")
    if "wrong_version_number" in low or "wrong version number" in low or (tls and ("ssl" in low or "tsi" in low
                                                                                  or "handshake" in low)):
        return "the TLS handshake failed: the server does not seem to use TLS (drop --tls and --tls-ca)"
    if "connection refused" in low:
        return "connection refused: nothing listens at that address"
    if any(w in low for w in ("dns resolution failed", "name or service not known", "errors resolving")):
        return "the host name does not resolve"
    if not tls and ("socket closed" in low or "connection reset" in low or "end of tcp stream" in low
                    or "http2 frame" in low or "connection closed" in low):
        return ("the server closed the connection at once: it probably expects TLS (add --tls-ca with its CA, "
                "or --tls)")
    return ""


def _layer_list(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers such as 1,2, got {text!r}") from None
    if not layers or min(layers) < 1:
        raise argparse.ArgumentTypeError(f"layer numbers start at 1, got {text!r}")
    return layers


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got {text!r}") from None


def _unescape(chars: str | None) -> str | None:
    """Let '\\n' and '\\t' on the command line mean newline and tab."""
    return None if chars is None else chars.replace("\\n", "\n").replace("\\t", "\t")


def _strip_chars(args) -> str | None:
    """--strip-delimiters / --strip-whitespace, refusing a value that is really the next argument."""
    chars = args.strip_delimiters
    if chars is not None and args.strip_whitespace:
        raise UserError("give --strip-delimiters or --strip-whitespace, not both")
    if args.strip_whitespace:
        return " \n\t"
    if chars == "":
        raise UserError("--strip-delimiters needs at least one character, e.g. --strip-delimiters=' '")
    if chars is not None and len(chars) > 1 and Path(chars).exists():
        raise UserError(f"--strip-delimiters takes the characters to remove, and {chars!r} looks like a file "
                        "name (the corpus?): write --strip-delimiters=CHARS, or --strip-whitespace")
    return _unescape(chars)


def _model_vocabulary(path: Path):
    """(vocabulary, characters the model was trained without, provenance) of a run directory or an
    exported model; the provenance names the training corpus and holds train_config."""
    if path.exists() and not path.is_dir():  # a file, or a device or pipe, which load_model names
        from hmlstm.serving.model import ModelLoadError, load_model

        try:
            model = load_model(path, "cpu")
        except ModelLoadError as e:
            raise UserError(str(e)) from None
        return model.vocab, model.provenance.get("strip_delimiters") or "", model.provenance
    quiet_tensorflow()
    from hmlstm.model.checkpoint import load_network

    _, info = load_network(path)  # UserError if it is not a run or its weights cannot be restored
    return info.vocab, info.meta.get("strip_delimiters") or "", {**info.meta, "train_config": info.train.to_dict()}


def _load_model(path, device, threads=None, spinning=None, config=None):
    from hmlstm.serving.model import ModelLoadError, load_model

    trt = dict(trt_cache=config.trt_cache, trt_fp16=config.trt_fp16, tolerance=config.device_tolerance,
               engine=config.engine) if config is not None else {}
    try:
        return load_model(path, device, threads, spinning, **trt)
    except ModelLoadError as e:
        raise UserError(str(e)) from None


def _held_out_quality(model_path: Path) -> dict[int, list[str]]:
    """Per layer, what its boundaries are worth on each text the model card evaluated (the held-out
    part of the training text, another text): layer 1 against words, the layers above against phrases
    or sentences (the one they find best), each against a random detector at the layer's rate."""
    import json

    from hmlstm import spec
    from hmlstm.evaluation import text_label

    try:
        card = json.loads(spec.card_path(model_path).read_text(encoding="utf-8"))
        evaluations = card["evaluation"]
        declared = {f"layer{k}": v for k, v in (card.get("boundary_alignment") or {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    lines: dict[int, list[str]] = {}
    for key, where in (("held_out", "held-out text"), ("other_text", "another text")):
        report = evaluations.get(key)
        if not isinstance(report, dict):
            continue
        for name, e in report.get("layers", {}).items():
            meant = ("words",) if name == "layer1" else ("phrases", "sentences")  # what each layer is taught
            # scored where the layer says it fires (a unit's first or last character), the other side only for
            # a card that declares none
            scores = [(unit, align, s) for unit in meant if unit in e for align, s in e[unit].items()
                      if declared.get(name) in (None, align)]
            if not scores:
                continue
            unit, align, s = max(scores, key=lambda x: x[2]["f1"] - x[2]["random_f1"])
            useful = s["f1"] >= s["random_f1"] + 0.10
            verdict = f"finds {unit}" if useful else "within 0.10 of a random detector: not a useful segmenter"
            lines.setdefault(int(name.removeprefix("layer")), []).append(
                f"{where} ({text_label(report['text'])}): {unit[:-1]}-{align} F1 {s['f1']:.2f} against "
                f"{s['random_f1']:.2f} for random firing at its rate: {verdict}")
    return lines
