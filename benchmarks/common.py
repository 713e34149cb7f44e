"""What the benchmark scripts share."""

from __future__ import annotations

from pathlib import Path


def absolute(path: str) -> Path:
    """argparse type of every path flag: the scripts' `robodistill` children run in the repository root, so a
    path relative to the user's directory would name another file there."""
    return Path(path).expanduser().resolve()
