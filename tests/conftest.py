"""Tests run fully offline, with a throw-away HF_HOME, on tiny models (a few marked tests use SmolLM2)."""
import os
import sys
import tempfile
from pathlib import Path

_home = tempfile.mkdtemp(prefix="salt-spice-hf-")
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=_home,
                  HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
os.environ.setdefault("SALT_SPICE_CACHE", os.path.join(_home, "salt-spice"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the embedded SmolLM2-135M model (runs in CI)")
