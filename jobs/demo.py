"""The one-command demo (what `make demo` runs): the whole lifecycle on the embedded default, offline.

    python jobs/demo.py --config jobs/configs/demo.toml
    ray job submit --working-dir . -- python jobs/demo.py --config jobs/configs/demo.toml

A second run skips every stage whose product exists (world, trained runs, reinforced dataset).
"""

import sys

from clipdr.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
