"""Held-out evaluation of expert-popularity predictors on a routing trace.

The trace is split by sequence: the first ``train_fraction`` of its sequences fit (calibrate and
tune) every predictor; the rest are walked as one token stream, in trace order, in windows of
``window`` consecutive tokens (a window may span the end of one sequence and the start of the
next, as a batch of a serving system would). Every window is predicted before the predictor is
updated with it, so no figure uses routing the predictor had already seen.

Per predictor, overall and per layer:

- log-likelihood: mean natural log of the predicted share of each known routed assignment (nats;
  higher is better; uniform scores -log E). ``exp(-log-likelihood)`` is the perplexity, the
  number of equally likely experts that would be as uncertain.
- top-k recall: the share of known routed assignments whose expert is among the k experts the
  predictor ranks highest for that token (ties to the lower id). Predictors without context rank
  once per layer and window; ``bayesian-conditional`` ranks per token, given the experts the
  token was routed to at the previous layer (known when its gate runs).
- load error: per window and layer, the mean absolute error of predicted expected vs actual
  tokens per expert, divided by the window's tokens with known routing at that layer; averaged
  over windows (and layers, overall).
- quantile coverage: the share of (window, layer, expert) loads at or below each predicted
  quantile (a calibrated forecast covers about its level).

Shape legend: T tokens, W tokens in a window, L MoE layers, K slots per token, E experts,
Q quantile levels. Imports numpy and rich only; knows nothing of models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.table import Table

from moeserve.predict.popularity import (
    DEFAULT_QUANTILES,
    PREDICTORS,
    PopularityPredictor,
    describe_predictor,
    forecast_loads,
    split_by_sequence,
)
from moeserve.traces.format import UNKNOWN_EXPERT, Trace

BASELINES_FIRST = ("uniform", "frequency", "bayesian", "bayesian-conditional")
"""Order of the default predictor list (any other registered ones follow, sorted)."""


@dataclass(frozen=True)
class LayerScores:
    """One predictor's figures on one MoE layer; NaN where the layer had no known routing."""

    layer: int
    log_likelihood: float
    """Mean log-probability per known assignment (nats)."""
    top_k_recall: float
    """Share of known assignments whose expert the predictor ranked in its top k."""
    load_error: float
    """Mean over windows of mean |expected - actual| per expert / window tokens."""
    quantile_coverage: tuple[float, ...]
    """Per quantile level: share of (window, expert) loads at or below the predicted quantile."""


@dataclass(frozen=True)
class PredictorScores:
    """One predictor's figures on the held-out part, overall (pooled over layers) and per layer."""

    name: str
    settings: dict[str, Any]
    """Hyperparameters after fitting; "inf" for infinity."""
    settings_source: str
    """"tuned" (on the training part), "given", "default" (too few training sequences) or "none"."""
    log_likelihood: float
    """Mean log-probability per known assignment over all layers (nats)."""
    top_k_recall: float
    load_error: float
    """Mean over (window, layer) pairs."""
    quantile_coverage: tuple[float, ...]
    layers: tuple[LayerScores, ...]

    @property
    def perplexity(self) -> float:
        """``exp(-log_likelihood)``: how many equally likely experts would be as uncertain."""
        return math.exp(-self.log_likelihood) if math.isfinite(self.log_likelihood) else math.nan


@dataclass(frozen=True)
class PredictorEvaluation:
    """Every evaluated predictor's scores and how they were obtained."""

    model: str
    num_experts: int
    top_k: int
    """The trace's K (experts per token and layer)."""
    num_layers: int
    recall_k: int
    """k of the top-k recall."""
    train_fraction: float
    window: int
    train_sequences: int
    train_tokens: int
    held_out_sequences: int
    held_out_tokens: int
    windows: int
    """Windows walked over the held-out part (the last may be shorter than ``window``)."""
    quantile_levels: tuple[float, ...]
    predictors: tuple[PredictorScores, ...]

    def scores(self, name: str) -> PredictorScores:
        """The scores of the predictor called ``name``; ``KeyError`` listing the evaluated ones."""
        for scores in self.predictors:
            if scores.name == name:
                return scores
        known = ", ".join(scores.name for scores in self.predictors)
        raise KeyError(f"predictor {name!r} was not evaluated; evaluated: {known}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, numbers and strings (``json.dumps``-able); NaN becomes None."""
        document = _plain(self)
        document["uniform_log_likelihood"] = -math.log(self.num_experts)
        for entry, scores in zip(document["predictors"], self.predictors, strict=True):
            entry["perplexity"] = _plain(scores.perplexity)
        return document

    def render_table(self, per_layer: bool = False) -> Table:
        """A rich table: one row per predictor, or with ``per_layer`` one row per layer
        (log-likelihood and top-k recall of every predictor)."""
        return self._layer_table() if per_layer else self._summary_table()

    def _title(self) -> str:
        return (
            f"{self.model}: predicting {self.held_out_tokens:,} held-out tokens "
            f"({_count(self.held_out_sequences, 'sequence')}) in {_count(self.windows, 'window')} "
            f"of {self.window}; trained on {self.train_tokens:,} tokens "
            f"({_count(self.train_sequences, 'sequence')})"
        )

    def _summary_table(self) -> Table:
        levels = "/".join(f"{level:g}" for level in self.quantile_levels)
        table = Table(
            title=self._title(),
            caption=(
                f"{self.num_experts} experts, top-{self.top_k}, {self.num_layers} MoE layers; recall at "
                f"k = {self.recall_k}; uniform log-likelihood = -log E = {-math.log(self.num_experts):.4f}. "
                "Tuned hyperparameters saw the training part only; bayesian-conditional also sees "
                "each token's experts at the previous layer."
            ),
        )
        table.add_column("predictor")
        table.add_column("settings")
        table.add_column("log-likelihood\n(nats/assignment)", justify="right")
        table.add_column("perplexity\n(experts)", justify="right")
        table.add_column(f"top-{self.recall_k}\nrecall", justify="right")
        table.add_column("load error\n(MAE/token)", justify="right")
        table.add_column(f"load coverage\nq{levels}", justify="right")
        for scores in self.predictors:
            table.add_row(
                scores.name,
                _format_settings(scores.settings, scores.settings_source),
                _format(scores.log_likelihood, 4),
                _format(scores.perplexity, 2),
                _format(scores.top_k_recall),
                _format(scores.load_error, 4),
                "/".join(_format(value, 2) for value in scores.quantile_coverage),
            )
        return table

    def _layer_table(self) -> Table:
        table = Table(
            title=self._title(),
            caption=f"log-likelihood in nats per assignment; recall at k = {self.recall_k}",
        )
        table.add_column("layer", justify="right")
        for scores in self.predictors:
            table.add_column(f"{scores.name}\nlog-lik", justify="right")
            table.add_column(f"{scores.name}\nrecall", justify="right")
        for layer in range(self.num_layers):
            cells = [str(layer)]
            for scores in self.predictors:
                cells.append(_format(scores.layers[layer].log_likelihood, 4))
                cells.append(_format(scores.layers[layer].top_k_recall))
            table.add_row(*cells)
        return table


def evaluate_predictors(
    trace: Trace,
    train_fraction: float = 0.5,
    window: int = 64,
    top_k: int | None = None,
    predictors: Sequence[str | PopularityPredictor] | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> PredictorEvaluation:
    """Fit every predictor on the first ``train_fraction`` of ``trace``'s sequences and score it on the rest.

    ``predictors`` are registry names or unfitted instances (default: every registered predictor,
    baselines first); ``top_k`` is the k of the recall (default ``trace.meta.top_k``). See the
    module docstring for the walk and the figures. Raises ``ValueError`` for a trace of fewer than
    two sequences, a fraction outside (0, 1), ``window < 1`` or k outside [1, E].
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 token, got {window}")
    num_experts = trace.meta.num_experts
    recall_k = trace.meta.top_k if top_k is None else top_k
    if not 1 <= recall_k <= num_experts:
        raise ValueError(f"top_k for recall must be in [1, {num_experts}], got {recall_k}")
    levels = tuple(float(level) for level in quantiles)
    train, held_out = split_by_sequence(trace, train_fraction)
    instances = [
        PREDICTORS.get(item)() if isinstance(item, str) else item
        for item in (_default_names() if predictors is None else predictors)
    ]
    scores = []
    for predictor in instances:
        predictor.fit(train, window)
        scores.append(_walk(predictor, held_out.experts, window, recall_k, levels))
    return PredictorEvaluation(
        model=trace.meta.model,
        num_experts=num_experts,
        top_k=trace.meta.top_k,
        num_layers=trace.num_layers,
        recall_k=recall_k,
        train_fraction=train_fraction,
        window=window,
        train_sequences=train.num_sequences,
        train_tokens=train.num_tokens,
        held_out_sequences=held_out.num_sequences,
        held_out_tokens=held_out.num_tokens,
        windows=math.ceil(held_out.num_tokens / window),
        quantile_levels=levels,
        predictors=tuple(scores),
    )


def _default_names() -> list[str]:
    first = [name for name in BASELINES_FIRST if name in PREDICTORS]
    return first + [name for name in PREDICTORS.names() if name not in first]


def _walk(
    predictor: PopularityPredictor,
    experts: np.ndarray,
    window: int,
    recall_k: int,
    levels: tuple[float, ...],
) -> PredictorScores:
    """Score a fitted predictor on ``experts`` (int [T, L, K]) window by window, updating after each."""
    num_layers = experts.shape[1]
    num_experts = predictor.num_experts
    log_sums = np.zeros(num_layers)  # [L]
    assignments = np.zeros(num_layers, dtype=np.int64)  # [L]
    hits = np.zeros(num_layers, dtype=np.int64)  # [L]
    load_error_sums = np.zeros(num_layers)  # [L]
    load_windows = np.zeros(num_layers, dtype=np.int64)  # [L]
    covered = np.zeros((len(levels), num_layers), dtype=np.int64)  # [Q, L]
    for start in range(0, experts.shape[0], window):
        chunk = experts[start : start + window].astype(np.int64)  # [W, L, K]
        window_log_sums, window_assignments = predictor.window_log_likelihood(chunk)
        log_sums += window_log_sums
        assignments += window_assignments
        no_context = np.full((chunk.shape[0], 1), UNKNOWN_EXPERT)  # [W, 1]
        tokens = np.zeros(num_layers, dtype=np.int64)  # [L] tokens with known routing per layer
        actual = np.zeros((num_layers, num_experts), dtype=np.int64)  # [L, E]
        inclusion = np.zeros((num_layers, num_experts))  # [L, E]
        concentration = np.ones((num_layers, num_experts))  # [L, E]
        for layer in range(num_layers):
            current = chunk[:, layer, :]  # [W, K]
            known = current != UNKNOWN_EXPERT  # [W, K]
            routed = known.any(axis=1)  # [W]
            tokens[layer] = routed.sum()
            if tokens[layer] == 0:
                continue
            previous = chunk[:, layer - 1, :] if layer > 0 else no_context  # [W, K]
            hits[layer] += _top_k_hits(predictor, layer, previous, current, known, recall_k)
            actual[layer] = np.bincount(current[known], minlength=num_experts)
            inclusion[layer], concentration[layer] = predictor.inclusion(
                layer, previous[routed] if predictor.uses_context else None
            )
        # One forecast per distinct token count (usually one for the whole window): the
        # beta-binomial mass over 0..W is the costly part, and it batches over layers.
        for count in np.unique(tokens[tokens > 0]):
            rows = np.flatnonzero(tokens == count)  # layers with this many routed tokens
            forecast = forecast_loads(inclusion[rows], int(count), concentration[rows], levels)
            load_error_sums[rows] += np.abs(forecast.expected - actual[rows]).mean(axis=1) / count
            load_windows[rows] += 1
            covered[:, rows] += (actual[rows][None] <= forecast.quantiles).sum(axis=2)
        predictor.update(chunk)
    layers = tuple(
        LayerScores(
            layer=layer,
            log_likelihood=_ratio(log_sums[layer], assignments[layer]),
            top_k_recall=_ratio(hits[layer], assignments[layer]),
            load_error=_ratio(load_error_sums[layer], load_windows[layer]),
            quantile_coverage=tuple(
                _ratio(covered[index, layer], load_windows[layer] * num_experts)
                for index in range(len(levels))
            ),
        )
        for layer in range(num_layers)
    )
    description = describe_predictor(predictor)
    return PredictorScores(
        name=predictor.name,
        settings=description["settings"],
        settings_source=description["settings_source"],
        log_likelihood=_ratio(log_sums.sum(), assignments.sum()),
        top_k_recall=_ratio(hits.sum(), assignments.sum()),
        load_error=_ratio(load_error_sums.sum(), load_windows.sum()),
        quantile_coverage=tuple(
            _ratio(covered[index].sum(), load_windows.sum() * num_experts) for index in range(len(levels))
        ),
        layers=layers,
    )


def _top_k_hits(
    predictor: PopularityPredictor,
    layer: int,
    previous: np.ndarray,
    current: np.ndarray,
    known: np.ndarray,
    recall_k: int,
) -> int:
    """Known assignments of ``current`` (int [W, K]) whose expert is in the token's predicted top k."""
    if not predictor.uses_context:
        shares = predictor.predict_distribution(layer)  # [E]
        top = np.argsort(-shares, kind="stable")[:recall_k]  # [k]
        in_top = np.zeros(shares.shape[0], dtype=bool)  # [E]
        in_top[top] = True
        return int(in_top[current[known]].sum())
    shares = predictor.predict_token_distributions(layer, previous)  # [W, E]
    top = np.argsort(-shares, axis=1, kind="stable")[:, :recall_k]  # [W, k]
    in_top = np.zeros(shares.shape, dtype=bool)  # [W, E]
    np.put_along_axis(in_top, top, True, axis=1)
    picked = np.take_along_axis(in_top, np.where(known, current, 0), axis=1)  # [W, K]
    return int(picked[known].sum())


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else math.nan


def _plain(value: Any) -> Any:
    if isinstance(value, PredictorEvaluation | PredictorScores | LayerScores):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


def _format(value: float, digits: int = 3) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _format_settings(settings: dict[str, Any], source: str) -> str:
    short = {
        "prior_strength": "s",
        "half_life_tokens": "half-life",
        "backoff_strength": "b",
        "transition_half_life_tokens": "transition half-life",
    }
    if not settings:
        return "-"
    values = ", ".join(
        f"{short.get(key, key)}={value:g}" if isinstance(value, float) else f"{short.get(key, key)}={value}"
        for key, value in settings.items()
    )
    return f"{values} ({source})"
