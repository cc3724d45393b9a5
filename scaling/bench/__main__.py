"""`python -m scaling.bench`: the benchmark CLI (scaling/bench/throughput.py)."""

import sys

from scaling.bench.throughput import main

sys.exit(main())
