"""Evaluation job entrypoint: zero-shot classification and retrieval of one model, logged to MLflow.

    python jobs/evaluate.py --config jobs/configs/demo.toml --set evaluate.model=models:/clipdr-demo@candidate
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/demo.toml

One model on one device, in this process (under ``ray job submit``: on the node running the entrypoint);
training evaluates itself on rank 0 with the same code. See ``clipdr evaluate --help``.
"""

import sys

from clipdr.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
