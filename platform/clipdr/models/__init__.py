"""MobileCLIP / MobileCLIP2 architectures by name, through open_clip's factory.

Importing this package registers the project's open_clip configs (MobileCLIP-S0 with its MCt text encoder, and
the tiny and demo twins of students, teachers and captioners) and the tiny MCi timm towers. Typical use::

    from clipdr import models

    model, _, preprocess = models.create_model_and_transforms("MobileCLIP-S0", pretrained=None)
    tokenizer = models.get_tokenizer("MobileCLIP-S0")
    fused = models.reparameterize(model)  # eval-mode copy for inference, export and benchmarks

``models.list_variants()`` names every variant (``size="paper"``: the real ones; ``family="debug"``: the tiny and
demo twins); ``models.get_variant(name)`` has the paper's numbers and the preprocessing.
"""

from clipdr.models.embedder import ClipEmbedder
from clipdr.models.factory import (
    count_params,
    create_model,
    create_model_and_transforms,
    describe_variants,
    get_tokenizer,
    image_size,
    model_config,
)
from clipdr.models.mct import MCt, MCtCfg
from clipdr.models.registry import (
    VARIANTS,
    Preprocess,
    Variant,
    get_variant,
    is_clipdr_config,
    list_variants,
    needs_clipdr,
    register,
)
from clipdr.models.reparam import reparameterize

register()

__all__ = [
    "VARIANTS",
    "ClipEmbedder",
    "MCt",
    "MCtCfg",
    "Preprocess",
    "Variant",
    "count_params",
    "create_model",
    "create_model_and_transforms",
    "describe_variants",
    "get_tokenizer",
    "get_variant",
    "image_size",
    "is_clipdr_config",
    "list_variants",
    "model_config",
    "needs_clipdr",
    "register",
    "reparameterize",
]
