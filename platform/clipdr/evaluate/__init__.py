"""Evaluation: zero-shot classification and image-text retrieval on clip_benchmark-layout datasets.

``evaluate_model(model, model_name, cfg.evaluate, device)`` is what training calls (cheap to repeat: decoded
images are cached per process); ``clipdr.evaluate.run.run(cfg)`` is the job behind ``clipdr evaluate`` (loads a
model by MLflow URI, checkpoint or name and logs to MLflow). This package imports no mlflow; ``run`` does.
"""

from clipdr.evaluate.datasets import RetrievalSet, ZeroShotTask, find_retrieval_set, find_zeroshot_tasks
from clipdr.evaluate.engine import EvalReport, clear_cache, evaluate, evaluate_model, preprocess_of, resolve_device
from clipdr.evaluate.loading import LoadedModel
from clipdr.evaluate.loading import load as load_model
from clipdr.evaluate.metrics import classifier_weights, retrieval_metrics, zeroshot_metrics

__all__ = [
    "EvalReport",
    "LoadedModel",
    "RetrievalSet",
    "ZeroShotTask",
    "classifier_weights",
    "clear_cache",
    "evaluate",
    "evaluate_model",
    "find_retrieval_set",
    "find_zeroshot_tasks",
    "load_model",
    "preprocess_of",
    "resolve_device",
    "retrieval_metrics",
    "zeroshot_metrics",
]
