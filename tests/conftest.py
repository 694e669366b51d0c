"""Put the repository root on sys.path so tests can `import attacks`, `import cas`, ... (pytest and unittest)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    """`pytest -m "not slow" tests` skips the end-to-end runs of the scripts (the quick check, about a minute)."""
    config.addinivalue_line("markers", "slow: an end-to-end run of a script (subprocess); deselect with -m 'not slow'")
