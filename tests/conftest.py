"""Tests run fully offline, with a throw-away HF_HOME, on tiny models (a few marked tests use SmolLM2)."""
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

_home = tempfile.mkdtemp(prefix="salt-spice-hf-")
# Reuse the converted embedded model (`bash run.sh setup` made it) rather than converting again per session:
# pin its cache folder before HF_HOME moves to the temporary one.
os.environ.setdefault("SALT_SPICE_CACHE", str(harness.cache_root()))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=_home,
                  HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Two OpenMP threads on a shared 2-core machine spin against each other; small tensors need one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the embedded SmolLM2-135M model (runs in CI)")
