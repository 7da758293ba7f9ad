"""What every experiment script shares: the repository root, the command line, the statistics and the paired rule."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
