"""Write one benchmark's section of docs/benchmarks.md, leaving the others alone."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
REPORT = DOCS / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun it to refresh.\n"


def machine() -> str:
    import os
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, body: str, report: Path = REPORT, header: str = HEADER) -> Path:
    DOCS.mkdir(exist_ok=True)
    text = report.read_text() if report.exists() else header
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    footer = f"_Written {stamp} on {machine()}._"
    block = f"<!-- BEGIN {name} -->\n{body.rstrip()}\n\n{footer}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    report.write_text(text)
    return report


def add_write_docs(ap) -> None:
    """The flag without which a benchmark only prints: a trial run never replaces the committed report."""
    ap.add_argument("--write-docs", action="store_true",
                    help="write the report into docs/ (without it the report is only printed)")


NOT_WRITTEN = "(not written: pass --write-docs to replace the committed report)"


def publish(name: str, body: str, write: bool, report: Path = REPORT) -> None:
    """Print a benchmark's report and, with --write-docs, replace its section of ``report``."""
    print(body)
    print(f"wrote {write_section(name, body, report)}" if write else NOT_WRITTEN)
