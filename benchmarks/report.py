"""benchmarks/BENCHMARKS.md: each benchmark script owns one section between its two marker lines
and rewrites it in place with `--write`; the rest of the file is left as it is."""

import os
import sys
from pathlib import Path

BENCHMARKS_MD = Path(__file__).parent / "BENCHMARKS.md"


def markers(name: str) -> tuple[str, str]:
    """The HTML comments that open and close section `name`."""
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def load_average() -> float:
    """The 1-minute load average before a run, printed: other tenants' work shows in every figure."""
    load = os.getloadavg()[0]
    print(f"1-minute load average before the run: {load:.2f}", flush=True)
    return load


def command_line(script: str, argv=None) -> str:
    """The command that ran benchmarks/`script` with `argv` (default: this process's arguments)."""
    return " ".join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def write_section(name: str, section: str) -> None:
    """Replace section `name` (markers included in `section`) or append it when it is new."""
    begin, end = markers(name)
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    BENCHMARKS_MD.write_text(text)
    print(f"updated {BENCHMARKS_MD}")


def write_titled_section(name: str, title: str, *paragraphs: str) -> None:
    """Section `name` as a `## title` heading and `paragraphs` separated by blank lines."""
    begin, end = markers(name)
    write_section(name, "\n".join([begin, f"## {title}", "", "\n\n".join(paragraphs), end]))
