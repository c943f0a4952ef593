"""Merge an overlay (a YAML file of the settings that differ) into params.yaml, keeping its comments.

    python scripts/apply_overlay.py my_pair.yaml            # params.yaml updated in place
    python scripts/apply_overlay.py my_pair.yaml --params other.yaml

The result is validated first (`stagediff.config.compose_params`, the merge the tests and
presets use): an unknown or bad key is refused, naming it, and params.yaml is left as it was.
"""

from __future__ import annotations

import argparse
import sys
from io import StringIO
from pathlib import Path

from ruamel.yaml import YAML

from stagediff.config import compose_params, read_params
from stagediff.errors import StagediffError
from stagediff.io import write_text


def merge_into(doc, overlay: dict) -> None:
    """Set the overlay's keys in a round-trip YAML document, section by section."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):  # (an empty mapping changes nothing,
            merge_into(doc[key], value)                                   # as in compose_params)
        else:
            doc[key] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlay", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        compose_params(args.params, args.overlay)  # refuses a bad overlay before anything is written
        overlay = read_params(args.overlay)
    except StagediffError as err:
        print(f"apply_overlay: error: {err}", file=sys.stderr)
        return 2
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout
    doc = yaml.load(args.params.read_text())
    merge_into(doc, overlay)
    out = StringIO()
    yaml.dump(doc, out)
    write_text(args.params, out.getvalue())
    print(f"{args.params}: updated with {args.overlay}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
