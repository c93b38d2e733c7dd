"""Legacy alias: `python -m retrain.report` is `retrain report` now (see retrain.cli)."""

import sys

from retrain.cli.main import legacy_entry

if __name__ == "__main__":
    sys.exit(legacy_entry("report"))
