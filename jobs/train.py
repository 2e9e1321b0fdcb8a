"""Training job entrypoint.

    python jobs/train.py --config jobs/configs/demo.toml [--set train.mode=clip --set train.run_name=baseline ...]
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/demo.toml

Alone it starts a local Ray; under ``ray job submit`` it joins the cluster (``RAY_ADDRESS``). Resubmitting with the
same ``train.output`` and ``train.run_name`` resumes the run from its last checkpoint, in the same MLflow run.
"""

import sys

from clipdr.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
