"""Entry point of ``python -m benchmarks``."""

import os
import sys

# PyTorch's OpenMP workers spin-wait after each op by default, stealing the cores from whichever
# implementation the round-robin times next (on 2 cores that skewed every small-shape ratio).
# Passive waiting must be chosen before torch is imported; a value set by the user is kept, and
# the one in effect is recorded in results.json.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.cli import main

sys.exit(main())
