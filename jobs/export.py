"""Export job entrypoint: open_clip-loadable weights, the re-parameterised model, ONNX encoders, a model card.

    python jobs/export.py --config jobs/configs/demo.toml --set export.model=models:/clipdr-demo@champion

See ``clipdr export --help``.
"""

import sys

from clipdr.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
