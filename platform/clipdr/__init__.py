"""clipdr: fast image-text models trained with multi-modal dataset reinforcement."""

__version__ = "0.1.0"
