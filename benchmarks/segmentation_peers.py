"""Word segmentation side by side with what users would pick instead: wordninja and wordsegment.

Every text has its whitespace removed; the truth is where each word started (word-start F1, the
definition `hmlstm evaluate` uses). Three texts, none in any training set of the shipped model:

- the built-in corpus's fixed held-out part (Python's documentation);
- Tiny Shakespeare, its first 200,000 characters (``--shakespeare``; ../shared/data, beside the project);
- news: the Lee background corpus (300 ABC news articles, 2001), as the gensim 4.4.0 wheel ships it for
  its tests, fetched by pip with the wheel's sha256 pinned and the text's own sha256 checked, kept in the
  hmlstm cache folder.

The packages drop punctuation, so they are given one sentence at a time (a sentence ends at . ! ?
followed by whitespace in the original), lower-cased, and every run of characters that are not letters
or digits is a segment of its own (the rule the issue measured with) or joins the word before it (each
package is shown under both); they segment each run of letters and digits by a Viterbi search over
the whole run (the delay is the sentence). The models decide each boundary causally, K characters after a
word's first character (K = 0: on reading it).

    pip install '.[bench]'      # wordninja 2.0.0 and wordsegment 1.3.1: benchmark-only, never the server's
    python benchmarks/segmentation_peers.py [--model hmlstm/assets/default.onnx ...] [--write-docs]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import NOT_WRITTEN, add_write_docs, write_section  # noqa: E402
from hmlstm import boundary_scores  # noqa: E402
from hmlstm.model.data import Corpus, cache_dir, load_corpus, prose_corpus, strip_corpus  # noqa: E402

STRIP = " \n\t"
SHAKESPEARE_CHARS = 200_000
DOCS = ROOT / "docs" / "segmentation.md"
# The news text: one file of a pinned wheel (any platform's wheel carries the same file).
NEWS_WHEEL = dict(package="gensim==4.4.0", platform="manylinux_2_28_x86_64", python="3.11", abi="cp311",
                  sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8")
NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
NEWS_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"


def news_text() -> str:
    """The Lee background corpus, from the pinned gensim wheel (downloaded once into the cache folder)."""
    kept = cache_dir() / "lee_background.cor"
    if kept.is_file() and hashlib.sha256(kept.read_bytes()).hexdigest() == NEWS_SHA256:
        return kept.read_text(encoding="utf-8")
    w = NEWS_WHEEL
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--platform", w["platform"], "--python-version", w["python"], "--implementation", "cp",
                        "--abi", w["abi"], "-d", tmp, w["package"]], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        if hashlib.sha256(wheel.read_bytes()).hexdigest() != w["sha256"]:
            sys.exit(f"{wheel.name}: sha256 differs from the pinned one; not using it")
        data = zipfile.ZipFile(wheel).read(NEWS_MEMBER)
    if hashlib.sha256(data).hexdigest() != NEWS_SHA256:
        sys.exit(f"{NEWS_MEMBER}: sha256 differs from the pinned one; not using it")
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(data)
    return data.decode("utf-8")


def texts(shakespeare: Path | None) -> dict[str, Corpus]:
    builtin = load_corpus("builtin", strip=STRIP)
    out = {"built-in held-out (Python docs)": builtin.part(builtin.held_out_start(0.1), None, "held out")}
    if shakespeare is not None and shakespeare.is_file():
        c = strip_corpus(prose_corpus(f"file:{shakespeare}", shakespeare.read_text(encoding="utf-8")), STRIP)
        out["Tiny Shakespeare, first 200,000"] = c.part(0, SHAKESPEARE_CHARS, "first 200,000")
    out["news (Lee corpus, ABC 2001)"] = strip_corpus(prose_corpus("news", news_text()), STRIP)
    return out


def word_starts(corpus: Corpus) -> np.ndarray:
    return corpus.unit_starts(("words",))[:, 0] > 0


def peer_starts(corpus: Corpus, split, punctuation: str = "own") -> np.ndarray:
    """Word starts from a dictionary segmenter ``split(lowercase letters and digits) -> pieces``, given one
    sentence at a time. A run of other characters is a segment of its own (``punctuation`` "own"), or
    joins the segment before it ("joined": "end." is one word; a sentence's first run still starts one)."""
    text, pred = corpus.text, np.zeros(len(corpus.text), bool)
    ends = np.flatnonzero(corpus.sentence_ends) if corpus.sentence_ends is not None else np.array([], int)
    start = 0
    for end in [*ends.tolist(), len(text) - 1]:
        sentence = text[start : end + 1]
        for m in re.finditer(r"[^\W_]+|[\W_]+", sentence):
            pos = start + m.start()
            if not m.group().isalnum():
                pred[pos] = punctuation == "own" or m.start() == 0
                continue
            pieces = split(m.group().lower())
            if sum(map(len, pieces)) != len(m.group()):  # a package that dropped characters: one segment
                pieces = [m.group()]
            for p in pieces:
                pred[pos] = True
                pos += len(p)
        start = end + 1
    return pred


def model_delay(path: Path) -> str:
    from hmlstm.serving.model import load_model

    k = load_model(path, "cpu", threads=1, spinning=False).lookahead
    return f"{k} (look-ahead)" if k else "0 (causal)"


def model_starts(path: Path, corpus: Corpus, layer: int = 1) -> np.ndarray:
    """Where the model's layer says words start (run_model has already moved a look-ahead model's
    boundaries back onto the characters they decide, running its padding steps at the end)."""
    from hmlstm.evaluation import run_model

    out = run_model(path, corpus.text)
    z = out.boundaries[:, layer - 1] > 0.5
    if out.alignment.get(layer, "start") == "end":  # a boundary on a word's last character starts the next
        z = np.concatenate([[True], z[:-1]])
    return z


def row(name: str, pred: np.ndarray, truth: np.ndarray, seconds: float, delay: str) -> str:
    s = boundary_scores.score(pred, truth)
    return (f"| {name} | **{s.f1:.3f}** | {s.precision:.3f} | {s.recall:.3f} | "
            f"{len(truth) / max(seconds, 1e-9):,.0f} | {delay} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", default=None,
                    help="an exported .onnx (repeat for several; default: the shipped model)")
    ap.add_argument("--shakespeare", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    ap.add_argument("--in-domain", type=Path, default=None, metavar="MODEL",
                    help="a model trained on the news text's first 90%% (see --fetch-news): a last section scores "
                         "every segmenter on its last 10%%")
    ap.add_argument("--fetch-news", type=Path, default=None, metavar="FILE",
                    help="write the pinned news text to FILE (to train an in-domain model on) and stop")
    add_write_docs(ap)
    args = ap.parse_args()
    if args.fetch_news:
        args.fetch_news.write_text(news_text(), encoding="utf-8")
        print(f"wrote {args.fetch_news} ({len(news_text()):,} characters)")
        return
    import wordninja
    import wordsegment

    wordsegment.load()
    from hmlstm.serving.model import DEFAULT_MODEL

    models = args.model or [DEFAULT_MODEL]
    lines = ["## Side by side with wordninja and wordsegment", "",
             "Written by `python benchmarks/segmentation_peers.py"
             + "".join(f" --model {m.name}" for m in args.model or [])
             + (f" --in-domain {args.in_domain.name}" if args.in_domain else "") + " --write-docs`. "
             "Word-start F1, precision and recall of "
             "layer 1 on each text with its whitespace removed; characters per second on one core of this "
             "machine (the model: ONNX Runtime, one stream, one thread); delay: how many characters after a "
             "word's first one its boundary is decided. The packages get one sentence at a time, lower-cased, "
             "each run of characters other than letters and digits a segment of its own or joined to the word "
             "before it (they drop punctuation).",
             ""]
    sections = [(name, corpus, models) for name, corpus in texts(args.shakespeare).items()]
    if args.in_domain:
        news = strip_corpus(prose_corpus("news", news_text()), STRIP)
        last = news.part(news.held_out_start(0.1), None, "last 10%")  # what `train --val-fraction 0.1` held out
        sections.append(("news, its last 10%, beside a model trained on its first 90% with their spaces",
                         last, [*models, args.in_domain]))
    for name, corpus, models in sections:
        truth = word_starts(corpus)
        lines += [f"### {name}: {len(corpus.text):,} characters, words start at {truth.mean():.1%} of them", "",
                  "| segmenter | word-start F1 | P | R | chars/s | delay |", "|---|---:|---:|---:|---:|---|"]
        for path in models:
            delay = model_delay(path)
            t0 = time.process_time()
            pred = model_starts(path, corpus)
            lines.append(row(f"hmlstm `{path.name}`", pred, truth, time.process_time() - t0, delay))
            print(lines[-1], flush=True)
        for peer, split in (("wordninja 2.0", wordninja.split), ("wordsegment 1.3", wordsegment.segment)):
            for rule, said in (("own", "punctuation its own segment"), ("joined", "punctuation joins the word")):
                t0 = time.process_time()
                pred = peer_starts(corpus, split, rule)
                lines.append(row(f"{peer} ({said})", pred, truth, time.process_time() - t0, "the sentence"))
                print(lines[-1], flush=True)
        lines.append("")
    body = "\n".join(lines)
    print(body)
    if args.write_docs:
        write_section("peers", body, report=DOCS, header="# Segmentation quality on text without delimiters\n")
    else:
        print(NOT_WRITTEN)


if __name__ == "__main__":
    main()
