"""Reinforcement job entrypoint.

    python jobs/reinforce.py --config jobs/configs/demo.toml [--set reinforce.num_augmentations=5 ...]
    ray job submit --working-dir . -- python jobs/reinforce.py --config jobs/configs/demo.toml

Alone it starts a local Ray; under ``ray job submit`` it joins the cluster (``RAY_ADDRESS``).
"""

import sys

from clipdr.cli import main

if __name__ == "__main__":
    sys.exit(main(["reinforce", *sys.argv[1:]]))
