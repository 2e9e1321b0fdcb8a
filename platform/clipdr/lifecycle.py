"""Model lifecycle in the MLflow registry: a registered version becomes ``candidate``; a gate makes it ``champion``.

The gate compares one evaluation metric (``lifecycle.metric``, e.g. ``zeroshot/mean_top1``; higher is better)
as recorded on each version's run: the training run, where training and ``clipdr evaluate`` log it. The
candidate is promoted only if it beats the current champion by more than ``min_delta``; the first version
of a model, with no champion yet, is promoted as long as it has been evaluated. Every decision states both
values, and is also written as tags on the candidate version (``gate.*``), so the registry UI shows why.

Consumers load ``models:/<name>@champion``; moving an alias is the whole deployment step, and moving it back
is the rollback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from clipdr import tracking
from clipdr.config import Config

CANDIDATE = "candidate"
CHAMPION = "champion"


class LifecycleError(ValueError):
    """A registered model, version or setting the gate cannot work with; the message says which."""


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of the gate, with both values it compared.

    Attributes:
        model: Registered model name.
        version: The candidate version.
        metric: The metric compared (higher is better).
        candidate_value: The candidate's value (None when its run does not record the metric).
        champion_version: The champion before the decision (None when there was none).
        champion_value: The champion's value (None when there was no champion or it lacks the metric).
        promoted: Whether ``champion`` now points at the candidate.
        reason: One sentence saying why.
    """

    model: str
    version: str
    metric: str
    candidate_value: float | None
    champion_version: str | None
    champion_value: float | None
    promoted: bool
    reason: str


def mark_candidate(name: str, version: str, *, uri: str = "") -> tracking.ModelVersion:
    """Points alias ``candidate`` of registered model ``name`` at ``version``."""
    try:
        tracking.set_model_alias(name, CANDIDATE, version, uri=uri)
        return tracking.get_model_version(name, version, uri=uri)
    except tracking.RegistryError as e:
        raise LifecycleError(str(e)) from None


def register_candidate(
    model_uri: str, name: str, *, tags: Mapping[str, str] | None = None, uri: str = ""
) -> tracking.ModelVersion:
    """Registers ``model_uri`` as a new version of ``name`` (created if needed) and makes it the candidate."""
    version = tracking.register_model_version(model_uri, name, tags=tags, uri=uri)
    return mark_candidate(name, version.version, uri=uri)


def metric_of(version: tracking.ModelVersion, metric: str, *, uri: str = "") -> float | None:
    """The latest value of ``metric`` on the run behind ``version`` (None when it has no run or no such metric)."""
    if not version.run_id:
        return None
    try:
        return tracking.run_summary(version.run_id, uri=uri).metrics.get(metric)
    except tracking.RegistryError:
        return None


def decide(
    name: str,
    metric: str,
    version: str,
    candidate_value: float | None,
    champion_version: str | None,
    champion_value: float | None,
    min_delta: float = 0.0,
) -> tuple[bool, str]:
    """The gate itself, as a pure function: ``(promote, reason)``."""
    if candidate_value is None:
        return False, (
            f"not promoted: candidate version {version} has no {metric} on its run; evaluate it first "
            f"(clipdr evaluate --set evaluate.model=models:/{name}/{version})"
        )
    if champion_version is None:
        return True, (
            f"promoted: no champion yet, so version {version} ({metric} = {candidate_value:.4f}) becomes the first"
        )
    if champion_version == version:
        return False, f"not promoted: version {version} is already the champion ({metric} = {candidate_value:.4f})"
    if champion_value is None:
        return False, (
            f"not promoted: champion version {champion_version} has no {metric} to compare with; evaluate it "
            f"on the same datasets (candidate version {version} has {candidate_value:.4f})"
        )
    delta = candidate_value - champion_value
    if delta > min_delta:
        return True, (
            f"promoted: candidate version {version} {metric} = {candidate_value:.4f} beats champion version "
            f"{champion_version}'s {champion_value:.4f} by {delta:+.4f} (> min_delta {min_delta:g})"
        )
    return False, (
        f"not promoted: candidate version {version} {metric} = {candidate_value:.4f} does not beat champion "
        f"version {champion_version}'s {champion_value:.4f} by more than min_delta {min_delta:g} ({delta:+.4f})"
    )


def promote(
    name: str, version: str = "", metric: str = "zeroshot/mean_top1", *, min_delta: float = 0.0, uri: str = ""
) -> PromotionDecision:
    """Runs the gate on ``version`` (default: the version aliased ``candidate``) of registered model ``name``.

    Moves alias ``champion`` to the candidate when it wins; tags the candidate version with the decision.

    Raises:
        LifecycleError: No such model or version, or no version given and no ``candidate`` alias set.
    """
    if not metric:
        raise LifecycleError("lifecycle.metric is empty: name an evaluation metric, e.g. zeroshot/mean_top1")
    if min_delta < 0:
        raise LifecycleError(f"lifecycle.min_delta must be >= 0, got {min_delta}")
    try:
        if version:
            candidate = tracking.get_model_version(name, version, uri=uri)
        else:
            found = tracking.get_model_version_by_alias(name, CANDIDATE, uri=uri)
            if found is None:
                raise LifecycleError(
                    f"registered model {name!r} has no {CANDIDATE!r} alias: set lifecycle.version, or register a "
                    "version as candidate first (clipdr.lifecycle.register_candidate / mark_candidate)"
                )
            candidate = found
        champion = tracking.get_model_version_by_alias(name, CHAMPION, uri=uri)
    except tracking.RegistryError as e:
        raise LifecycleError(str(e)) from None

    candidate_value = metric_of(candidate, metric, uri=uri)
    champion_value = metric_of(champion, metric, uri=uri) if champion is not None else None
    promoted, reason = decide(
        name,
        metric,
        candidate.version,
        candidate_value,
        champion.version if champion is not None else None,
        champion_value,
        min_delta,
    )
    if promoted:
        tracking.set_model_alias(name, CHAMPION, candidate.version, uri=uri)
    tags = {"gate.metric": metric, "gate.promoted": str(promoted).lower(), "gate.reason": reason}
    tracking.set_model_version_tags(name, candidate.version, tags, uri=uri)
    return PromotionDecision(
        model=name,
        version=candidate.version,
        metric=metric,
        candidate_value=candidate_value,
        champion_version=champion.version if champion is not None else None,
        champion_value=champion_value,
        promoted=promoted,
        reason=reason,
    )


def run(cfg: Config, log: Callable[[str], None] = print) -> PromotionDecision:
    """``clipdr promote``: gates ``lifecycle.version`` (made the candidate first) or the current candidate."""
    lc = cfg.lifecycle
    if not lc.model:
        raise LifecycleError("set lifecycle.model to the registered model name")
    if lc.version < 0:
        raise LifecycleError(f"lifecycle.version must be a version number (0: the candidate), got {lc.version}")
    version = str(lc.version) if lc.version else ""
    if version:
        mark_candidate(lc.model, version, uri=cfg.tracking.uri)
    decision = promote(lc.model, version, lc.metric, min_delta=lc.min_delta, uri=cfg.tracking.uri)
    log(f"promote {lc.model}: {decision.reason}")
    return decision
