"""Run one benchmark: ``python jobs/benchmark.py latency [--variants ...] [--quick] [--output PATH]``."""

import sys

from clipdr.benchmarks import main

if __name__ == "__main__":
    sys.exit(main(prog="jobs/benchmark.py"))
