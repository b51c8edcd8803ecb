"""Write docs/cli-options.md: every ``nucleae`` sub-command's options with their defaults and
choices, read from the parser itself (so the page and the command cannot disagree; a test
checks that the committed page is current).

    python scripts/cli_reference.py [--out docs/cli-options.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_nucleae.cli import options_reference

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/cli-options.md"))
    out = parser.parse_args().out
    out.write_text(options_reference(), encoding="utf-8")
    print(f"wrote {out}")
