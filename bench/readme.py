"""Writes a benchmark's block into README.md between its own begin/end markers, so a full run
updates its figures in place and the prose around them stays the author's."""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def splice(readme: Path, name: str, block: str, heading: str) -> None:
    """Replaces what lies between `name`'s markers with `block`; without the markers, appends
    them under `heading` at the end."""
    begin, end = markers(name)
    text = readme.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + begin + "\n" + block + "\n" + end + tail
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + begin + "\n" + block + "\n" + end + "\n"
    readme.write_text(text)
