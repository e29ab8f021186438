"""Expert-popularity predictors: which experts of a layer the next tokens will be routed to.

Shape legend: T tokens, W tokens in one window, L MoE layers, K slots per token (top_k),
K' ids of one token at the previous layer (any width), E experts, Q quantile levels.

A predictor is a small class on routing arrays; it knows nothing of models, tensors or
processes. Every predictor follows one protocol::

    fit(trace, window=64)                  calibrate on the training part (a Trace); resets state
    update(window)                         int [W, L, K] ids of tokens that just arrived (-1 unknown)
    predict_distribution(layer, context)   float64 [E]: share of the layer's next routed assignments
    predict_token_distributions(layer, previous)
                                           float64 [W, E]: the same for each of W tokens, given the
                                           ids each was routed to at layer - 1 (previous, [W, K'])
    predict_loads(layer, window_tokens)    LoadForecast: expected tokens per expert and quantiles
    inclusion(layer, previous=None)        float64 [E] per-token inclusion probabilities and [E]
                                           the concentration of their uncertainty (the inputs of
                                           ``forecast_loads``, which batches over layers)
    window_log_likelihood(window)          ([L] summed log-probabilities, [L] assignment counts)
                                           of a window's known assignments, before it is updated

Probabilities are over *routed assignments*: a token routed to K experts at a layer makes K
assignments, and each is scored as one categorical draw from the predicted distribution. The K
ids of a token are a set (drawn without replacement), so this is an approximation that every
predictor shares; it ranks predictors fairly and keeps the posteriors conjugate. Ids equal to -1
(unknown routing) are skipped everywhere.

Registered in :data:`PREDICTORS` (constructed with no arguments: hyperparameters are tuned on
the training part when ``fit`` runs):

========================  ===================================================================
``uniform``               every expert equally likely (the floor: log-likelihood -log E)
``frequency``             cumulative counts (training part plus every update), add-one smoothing
``bayesian``              Dirichlet-multinomial per layer: prior from the training part scaled
                          to a prior strength; online evidence with exponential forgetting
``bayesian-conditional``  Dirichlet per (layer, expert at the previous layer), backing off to
                          the ``bayesian`` posterior; a token mixes the rows of its previous ids
========================  ===================================================================

Load forecasts (``predict_loads``) use a beta-binomial approximation, not sampling: a token at a
layer includes expert e with probability ``pi_e = min(1, K * p_e)`` (p the predicted assignment
share); the load of e over W tokens is BetaBinomial(W, pi_e * c, (1 - pi_e) * c) where ``c`` is a
concentration moment-matched to the Dirichlet posterior's uncertainty about ``p_e`` (Binomial
when the predictor is a point estimate, c = inf; ``bayesian-conditional`` borrows its marginal's
c, as a mixture has no single Dirichlet). It treats tokens as exchangeable given the posterior,
so it ignores the correlation between neighbouring tokens; the evaluation reports how often
actual loads stay under each quantile, which shows how much that matters.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from moeserve.registry import Registry
from moeserve.traces.format import UNKNOWN_EXPERT, Trace

PREDICTORS: Registry[type[PopularityPredictor]] = Registry("popularity predictor")
"""Every popularity predictor by name; build one with ``PREDICTORS.get(name)()``."""

DEFAULT_WINDOW = 64
"""Tokens per ``update`` assumed when tuning, unless ``fit`` is told otherwise."""

DEFAULT_QUANTILES = (0.5, 0.9, 0.99)
"""Load-forecast quantile levels unless the caller names others."""


# -- counting ------------------------------------------------------------------------------------


def layer_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """float64 [L, E]: how many known assignments name each expert, per layer.

    ``experts`` is int [W, L, K] (-1 unknown, skipped); ids must lie in [0, num_experts).
    """
    num_layers = experts.shape[1]
    layer_offsets = np.arange(num_layers, dtype=np.int64)[None, :, None] * num_experts  # [1, L, 1]
    flat = (layer_offsets + experts)[experts != UNKNOWN_EXPERT]  # [known]
    counts = np.bincount(flat, minlength=num_layers * num_experts)
    return counts.reshape(num_layers, num_experts).astype(np.float64)


def transition_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """float64 [L, E, E]: ``[l, j, e]`` = tokens routed to j at layer l - 1 and to e at layer l.

    ``experts`` is int [W, L, K]; pairs with a -1 on either side are skipped; ``[0]`` is all zero
    (layer 0 has no previous layer).
    """
    num_tokens, num_layers, _ = experts.shape
    counts = np.zeros((num_layers, num_experts, num_experts))
    if num_layers < 2 or num_tokens == 0:
        return counts
    previous = experts[:, :-1, :, None].astype(np.int64)  # [W, L-1, K, 1]
    current = experts[:, 1:, None, :].astype(np.int64)  # [W, L-1, 1, K]
    known = (previous != UNKNOWN_EXPERT) & (current != UNKNOWN_EXPERT)  # [W, L-1, K, K]
    layer_index = np.arange(num_layers - 1, dtype=np.int64)[None, :, None, None]  # [1, L-1, 1, 1]
    flat = ((layer_index * num_experts + previous) * num_experts + current)[known]  # [pairs]
    pairs = np.bincount(flat, minlength=(num_layers - 1) * num_experts * num_experts)
    counts[1:] = pairs.reshape(num_layers - 1, num_experts, num_experts)
    return counts


def split_by_sequence(trace: Trace, fraction: float) -> tuple[Trace, Trace]:
    """The first ``round(fraction * S)`` sequences and the rest, as two traces (views, not copies).

    Each part gets at least one sequence; a trace with fewer than two sequences cannot be split
    and raises ``ValueError``, as does a fraction outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    num_sequences = trace.num_sequences
    if num_sequences < 2:
        raise ValueError(f"cannot split a trace of {num_sequences} sequence(s) into two parts by sequence")
    first_count = min(max(round(fraction * num_sequences), 1), num_sequences - 1)
    return _sequences(trace, 0, first_count), _sequences(trace, first_count, num_sequences)


def _sequences(trace: Trace, start: int, stop: int) -> Trace:
    """Sequences ``start:stop`` of ``trace`` as a trace of their own (array views)."""
    first_row, last_row = int(trace.offsets[start]), int(trace.offsets[stop])
    weights = None if trace.weights is None else trace.weights[first_row:last_row]
    return Trace(
        experts=trace.experts[first_row:last_row],
        offsets=trace.offsets[start : stop + 1] - trace.offsets[start],
        meta=trace.meta,
        weights=weights,
    )


def _decay(half_life_tokens: float, num_tokens: int) -> float:
    """Weight left to old evidence after ``num_tokens`` tokens: 2 ** (-num_tokens / half_life)."""
    return 0.5 ** (num_tokens / half_life_tokens)


# -- load forecasts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadForecast:
    """Predicted load of every expert over a window of ``window_tokens`` tokens.

    From ``predict_loads`` the arrays are per expert of one layer ([E]); ``forecast_loads`` keeps
    any leading axes of its input (e.g. [L, E] for all layers at once), written [..., E].
    """

    window_tokens: int
    """W: tokens the forecast is for."""
    expected: np.ndarray
    """float64 [..., E]: expected tokens routed to each expert (sums to about W * K per layer)."""
    levels: tuple[float, ...]
    """Q quantile levels, each in (0, 1)."""
    quantiles: np.ndarray
    """int64 [Q, ..., E]: for each level q, the smallest load x with P(load <= x) >= q."""


def forecast_loads(
    inclusion: np.ndarray,
    window_tokens: int,
    concentration: np.ndarray | float,
    levels: Sequence[float] = DEFAULT_QUANTILES,
) -> LoadForecast:
    """Loads over ``window_tokens`` tokens when each token includes expert e with probability ``inclusion[e]``.

    ``inclusion`` is float [..., E] in [0, 1]; ``concentration`` (broadcastable to it, > 0,
    ``math.inf`` for a known probability) is the beta concentration of the uncertainty about it.
    The load of e is BetaBinomial(W, inclusion * c, (1 - inclusion) * c), or Binomial(W,
    inclusion) when c is infinite; quantiles come from its exact probability mass function (a
    recurrence over 0..W), not from sampling.
    """
    levels = tuple(float(level) for level in levels)
    if any(not 0.0 < level < 1.0 for level in levels):
        raise ValueError(f"quantile levels must be in (0, 1), got {levels}")
    if window_tokens < 0:
        raise ValueError(f"window_tokens must be >= 0, got {window_tokens}")
    inclusion = np.clip(np.asarray(inclusion, dtype=np.float64), 0.0, 1.0)  # [..., E]
    concentration = np.broadcast_to(np.asarray(concentration, dtype=np.float64), inclusion.shape)  # [..., E]
    if (concentration <= 0).any() or np.isnan(concentration).any():
        raise ValueError("concentration must be > 0 (math.inf for a known inclusion probability)")
    expected = window_tokens * inclusion  # [..., E]
    quantiles = np.zeros((len(levels), *inclusion.shape), dtype=np.int64)  # [Q, ..., E]
    if window_tokens == 0 or inclusion.size == 0:
        return LoadForecast(window_tokens, expected, levels, quantiles)
    cdf = _load_cdf(inclusion.reshape(-1), window_tokens, concentration.reshape(-1))  # [N, W+1]
    for index, level in enumerate(levels):
        # A tiny slack keeps round-off in the cumulative sum from pushing a quantile one step up.
        quantiles[index] = (cdf < level - 1e-12).sum(axis=1).reshape(inclusion.shape)
    return LoadForecast(window_tokens, expected, levels, quantiles)


def _load_cdf(inclusion: np.ndarray, trials: int, concentration: np.ndarray) -> np.ndarray:
    """float64 [N, n+1]: cumulative distribution over 0..n of N loads (inclusion, concentration [N]).

    The (beta-)binomial mass follows the ratio pmf(k+1) / pmf(k), summed in log space, so no
    gamma function is needed. Inclusion 0 or 1 puts all mass on 0 or n.
    """
    successes = np.arange(trials, dtype=np.float64)  # [n]: k = 0..n-1
    binomial_part = np.log(trials - successes) - np.log(successes + 1.0)  # [n]
    interior = (inclusion > 0.0) & (inclusion < 1.0)  # [N]
    safe = np.where(interior, inclusion, 0.5)  # [N]; the edges are overwritten below
    finite = np.isfinite(concentration)  # [N]
    alpha = np.where(finite, safe * concentration, 1.0)[:, None]  # [N, 1]
    beta = np.where(finite, (1.0 - safe) * concentration, 1.0)[:, None]  # [N, 1]
    # Beta-binomial: (k + alpha) / (n - k - 1 + beta); binomial: the odds pi / (1 - pi).
    odds = (safe / (1.0 - safe))[:, None]  # [N, 1]
    ratio = np.where(finite[:, None], (successes + alpha) / (trials - successes - 1.0 + beta), odds)  # [N, n]
    log_ratio = np.log(ratio)
    log_ratio += binomial_part
    log_mass = np.zeros((inclusion.shape[0], trials + 1))  # [N, n+1]
    np.cumsum(log_ratio, axis=1, out=log_mass[:, 1:])
    log_mass -= log_mass.max(axis=1, keepdims=True)
    mass = np.exp(log_mass)
    mass[inclusion <= 0.0] = 0.0
    mass[inclusion <= 0.0, 0] = 1.0
    mass[inclusion >= 1.0] = 0.0
    mass[inclusion >= 1.0, trials] = 1.0
    cdf = np.cumsum(mass, axis=1)
    return cdf / cdf[:, -1:]


def _inclusion_concentration(share: np.ndarray, total: float, top_k: int) -> np.ndarray:
    """float64 [E]: beta concentration of ``pi = K * p`` when p ~ Beta(total * share, total * (1 - share)).

    Moment matching: var(pi) = K^2 share (1 - share) / (total + 1), and a Beta with mean mu and
    variance v has concentration mu (1 - mu) / v - 1. Floored at a small positive value where
    ``K * share`` nears 1 (the matched Beta would not exist).
    """
    share = np.clip(share, 1e-12, 1.0 - 1e-12)
    matched = (1.0 - top_k * share) * (total + 1.0) / (top_k * (1.0 - share)) - 1.0
    return np.maximum(matched, 1e-3)


# -- the protocol --------------------------------------------------------------------------------


class PopularityPredictor(ABC):
    """Predicts per-layer expert popularity from routing seen so far; see the module docstring.

    ``fit`` must run first; it reads E, L and K from the trace. Windows passed to ``update`` and
    ``window_log_likelihood`` are int [W, L, K] with ids in [0, E) or -1; anything else raises
    ``ValueError``.
    """

    name: ClassVar[str]
    """Registry name, also used in reports."""
    uses_context: ClassVar[bool] = False
    """True when predictions depend on each token's previous-layer experts."""

    num_experts: int
    num_layers: int
    top_k: int

    def fit(self, trace: Trace, window: int = DEFAULT_WINDOW) -> None:
        """Calibrate on ``trace`` (the training part) and forget any earlier state.

        ``window`` is the number of tokens per ``update`` the predictor will see; predictors that
        tune hyperparameters simulate that cadence on part of ``trace``.
        """
        if window < 1:
            raise ValueError(f"window must be >= 1 token, got {window}")
        self.num_experts = trace.meta.num_experts
        self.num_layers = trace.num_layers
        self.top_k = trace.meta.top_k
        self._fit(trace, window)

    @abstractmethod
    def _fit(self, trace: Trace, window: int) -> None:
        """Subclass part of ``fit``: shapes are set, state must be (re)built from ``trace``."""

    def update(self, window: np.ndarray) -> None:
        """Take in the routing of ``window`` (int [W, L, K]) as online evidence."""
        self._update(self._checked(window))

    @abstractmethod
    def _update(self, window: np.ndarray) -> None:
        """Subclass part of ``update``; ``window`` is checked int64 [W, L, K]."""

    @abstractmethod
    def predict_token_distributions(self, layer: int, previous: np.ndarray) -> np.ndarray:
        """float64 [W, E], rows summing to 1: predicted assignment shares for each of W tokens at ``layer``.

        ``previous`` is int [W, K'], the ids each token was routed to at ``layer - 1`` (-1 unknown);
        it is ignored at layer 0 and by predictors without context (their rows are all equal and
        may be a read-only broadcast view).
        """

    def predict_distribution(self, layer: int, context: np.ndarray | None = None) -> np.ndarray:
        """float64 [E] summing to 1: predicted share of ``layer``'s next routed assignments per expert.

        ``context`` (int [K'], optional) is the ids the token was routed to at ``layer - 1``; without
        it, or for predictors without context, this is the layer's marginal prediction.
        """
        self._check_layer(layer)
        if context is None:
            context = np.full(1, UNKNOWN_EXPERT)
        previous = np.asarray(context, dtype=np.int64).reshape(1, -1)  # [1, K']
        return np.array(self.predict_token_distributions(layer, previous)[0])

    def predict_loads(
        self,
        layer: int,
        window_tokens: int,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        previous: np.ndarray | None = None,
    ) -> LoadForecast:
        """Forecast per-expert loads (tokens routed to each expert) at ``layer`` over ``window_tokens`` tokens.

        ``previous`` (int [window_tokens, K'], optional) gives each token's ids at ``layer - 1`` for
        predictors with context; without it the forecast uses the layer's marginal prediction.
        Expected loads are exact under the model; quantiles use the beta-binomial approximation in
        the module docstring (``forecast_loads``).
        """
        if previous is not None and previous.shape[0] != window_tokens:
            raise ValueError(f"previous has {previous.shape[0]} rows for a window of {window_tokens} tokens")
        inclusion, concentration = self.inclusion(layer, previous)
        return forecast_loads(inclusion, window_tokens, concentration, quantiles)

    def inclusion(self, layer: int, previous: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-token inclusion probabilities at ``layer`` and the beta concentration of their uncertainty.

        Returns float64 [E] ``min(1, K * share)`` (averaged over the tokens of ``previous``, int
        [W, K'], when given to a predictor with context) and float64 [E] concentration (inf for a
        point estimate). The inputs of ``forecast_loads``.
        """
        self._check_layer(layer)
        if previous is None or not self.uses_context or previous.shape[0] == 0:
            inclusion = np.minimum(1.0, self.top_k * self.predict_distribution(layer))  # [E]
        else:
            shares = self.predict_token_distributions(layer, np.asarray(previous, dtype=np.int64))  # [W, E]
            inclusion = np.minimum(1.0, self.top_k * shares).mean(axis=0)  # [E]
        concentration = np.broadcast_to(
            np.asarray(self.load_concentration(layer), dtype=np.float64), inclusion.shape
        )
        return inclusion, np.array(concentration)

    def load_concentration(self, layer: int) -> np.ndarray | float:
        """Beta concentration [E] (or scalar) of the per-token inclusion probabilities; inf for point estimates."""
        return math.inf

    def window_log_likelihood(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score ``window`` (int [W, L, K]) under the current prediction, without updating.

        Returns float64 [L] summed natural-log probabilities of the known assignments (for
        context predictors, each token is scored given its own ids at the previous layer) and
        int64 [L] how many known assignments each layer has. Reference implementation on
        ``predict_token_distributions``; subclasses may override with a faster equivalent.
        """
        window = self._checked(window)
        log_sums = np.zeros(self.num_layers)
        assignments = (window != UNKNOWN_EXPERT).sum(axis=(0, 2))  # [L]
        no_context = np.full((window.shape[0], 1), UNKNOWN_EXPERT)
        for layer in range(self.num_layers):
            previous = window[:, layer - 1, :] if layer > 0 else no_context  # [W, K]
            shares = self.predict_token_distributions(layer, previous)  # [W, E]
            current = window[:, layer, :]  # [W, K]
            known = current != UNKNOWN_EXPERT
            picked = np.take_along_axis(shares, np.where(known, current, 0), axis=1)  # [W, K]
            log_sums[layer] = np.log(picked[known]).sum()
        return log_sums, assignments

    def settings_dict(self) -> dict[str, float]:
        """Resolved hyperparameters by name, for reports (empty when there are none)."""
        return {}

    @property
    def settings_source(self) -> str:
        """Where ``settings_dict`` came from: "given", "tuned" (on the training part), "default"
        (the training part had too few sequences to tune) or "none" (no hyperparameters)."""
        return "none"

    def _checked(self, window: np.ndarray) -> np.ndarray:
        window = np.asarray(window)
        expected = (self.num_layers, self.top_k)
        if window.ndim != 3 or window.shape[1:] != expected:
            raise ValueError(f"window must have shape [W, {expected[0]}, {expected[1]}], got {window.shape}")
        if window.dtype.kind not in ("i", "u"):
            raise ValueError(f"window expert ids must be integers, got dtype {window.dtype}")
        if window.size and (window.min() < UNKNOWN_EXPERT or window.max() >= self.num_experts):
            raise ValueError(
                f"window expert ids must be in [0, {self.num_experts}) or {UNKNOWN_EXPERT}, "
                f"got range [{window.min()}, {window.max()}]"
            )
        return window.astype(np.int64, copy=False)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for {self.num_layers} MoE layers")


class MarginalPredictor(PopularityPredictor):
    """A predictor whose prediction is one distribution per layer, the same for every token."""

    @abstractmethod
    def probabilities(self) -> np.ndarray:
        """float64 [L, E], rows summing to 1: the current prediction of every layer."""

    def predict_token_distributions(self, layer: int, previous: np.ndarray) -> np.ndarray:
        self._check_layer(layer)
        return np.broadcast_to(self.probabilities()[layer], (previous.shape[0], self.num_experts))

    def predict_distribution(self, layer: int, context: np.ndarray | None = None) -> np.ndarray:
        self._check_layer(layer)
        return np.array(self.probabilities()[layer])

    def window_log_likelihood(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        window = self._checked(window)
        counts = layer_counts(window, self.num_experts)  # [L, E]
        log_sums = (counts * np.log(self.probabilities())).sum(axis=1)  # [L]
        return log_sums, counts.sum(axis=1).astype(np.int64)


# -- baselines -----------------------------------------------------------------------------------


@PREDICTORS.register("uniform")
class UniformPredictor(MarginalPredictor):
    """Every expert equally likely at every layer; ignores all routing."""

    name = "uniform"

    def _fit(self, trace: Trace, window: int) -> None:
        self._probabilities = np.full((self.num_layers, self.num_experts), 1.0 / self.num_experts)

    def _update(self, window: np.ndarray) -> None:
        pass

    def probabilities(self) -> np.ndarray:
        return self._probabilities


@PREDICTORS.register("frequency")
class FrequencyPredictor(MarginalPredictor):
    """Empirical assignment shares with add-one smoothing: ``(counts + 1) / (total + E)`` per layer.

    ``counts`` are the training part's plus every window passed to ``update``, never forgotten:
    the "historical activation counts" baseline. Its load forecasts treat the shares as known.
    """

    name = "frequency"

    def _fit(self, trace: Trace, window: int) -> None:
        self._counts = layer_counts(trace.experts, self.num_experts)  # [L, E]

    def _update(self, window: np.ndarray) -> None:
        self._counts += layer_counts(window, self.num_experts)

    def probabilities(self) -> np.ndarray:
        smoothed = self._counts + 1.0  # [L, E]
        return smoothed / smoothed.sum(axis=1, keepdims=True)


# -- Bayesian predictors -------------------------------------------------------------------------


@dataclass(frozen=True)
class TuningGrid:
    """Candidates tried when a Bayesian predictor tunes its hyperparameters on the training part.

    ``fit`` holds back the last ``tuning_fraction`` of the training sequences, calibrates each
    candidate on the rest, walks the held-back part in windows (score, then update) and keeps the
    candidate with the highest log-likelihood per assignment; ties go to the earlier candidate.
    The marginal's two values are searched on the full grid; the conditional's by coordinate
    search (half-life at the default back-off strength, then strength at that half-life).
    """

    tuning_fraction: float = 0.3
    """Share of the training sequences held back to score candidates, in (0, 1)."""
    prior_strengths: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
    """``BayesianSettings.prior_strength`` candidates."""
    half_lives: tuple[float, ...] = (16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, math.inf)
    """``BayesianSettings.half_life_tokens`` candidates."""
    backoff_strengths: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    """``ConditionalSettings.backoff_strength`` candidates."""
    transition_half_lives: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0, math.inf)
    """``ConditionalSettings.half_life_tokens`` candidates."""

    def __post_init__(self) -> None:
        if not 0.0 < self.tuning_fraction < 1.0:
            raise ValueError(f"tuning_fraction must be in (0, 1), got {self.tuning_fraction}")
        for name in ("prior_strengths", "half_lives", "backoff_strengths", "transition_half_lives"):
            values = getattr(self, name)
            if not values or any(not value > 0 for value in values):
                raise ValueError(
                    f"TuningGrid.{name} must be a non-empty tuple of positive values, got {values}"
                )


@dataclass(frozen=True)
class BayesianSettings:
    """Hyperparameters of :class:`BayesianPredictor`."""

    prior_strength: float
    """Pseudo-counts of the calibration prior per layer: the prior is Dirichlet(s * calibration shares)."""
    half_life_tokens: float
    """Tokens after which online evidence weighs half as much; ``math.inf`` never forgets."""

    def __post_init__(self) -> None:
        if not (self.prior_strength > 0 and math.isfinite(self.prior_strength)):
            raise ValueError(f"prior_strength must be a positive finite number, got {self.prior_strength}")
        if not self.half_life_tokens > 0:
            raise ValueError(
                f"half_life_tokens must be > 0 (math.inf: never forget), got {self.half_life_tokens}"
            )


@dataclass(frozen=True)
class ConditionalSettings:
    """Hyperparameters of :class:`ConditionalBayesianPredictor` beyond its marginal's."""

    backoff_strength: float
    """Pseudo-counts of the layer's marginal posterior in every (layer, previous expert) prior."""
    half_life_tokens: float
    """Tokens after which transition evidence weighs half as much; ``math.inf`` never forgets."""

    def __post_init__(self) -> None:
        if not (self.backoff_strength > 0 and math.isfinite(self.backoff_strength)):
            raise ValueError(
                f"backoff_strength must be a positive finite number, got {self.backoff_strength}"
            )
        if not self.half_life_tokens > 0:
            raise ValueError(
                f"half_life_tokens must be > 0 (math.inf: never forget), got {self.half_life_tokens}"
            )


DEFAULT_BAYESIAN_SETTINGS = BayesianSettings(prior_strength=300.0, half_life_tokens=64.0)
"""Used when tuning is impossible (a training part of one sequence); tuned value on the DeepSeek trace."""
DEFAULT_CONDITIONAL_SETTINGS = ConditionalSettings(backoff_strength=1.0, half_life_tokens=128.0)
"""Used when tuning is impossible, and the starting point of its coordinate search; tuned on DeepSeek."""


def held_out_log_likelihood(predictor: PopularityPredictor, experts: np.ndarray, window: int) -> float:
    """Mean log-likelihood per known assignment of ``experts`` (int [T, L, K]) walked in windows.

    Each window of ``window`` consecutive rows is scored before the predictor is updated with it
    (the predictor must be fitted). NaN when ``experts`` has no known assignment.
    """
    total, assignments = 0.0, 0
    for start in range(0, experts.shape[0], window):
        chunk = experts[start : start + window]  # [W, L, K]
        log_sums, counts = predictor.window_log_likelihood(chunk)
        total += float(log_sums.sum())
        assignments += int(counts.sum())
        predictor.update(chunk)
    return total / assignments if assignments else math.nan


def _tuning_split(trace: Trace, grid: TuningGrid) -> tuple[Trace, Trace] | None:
    """(calibration, tuning) parts of a training trace, or None when it has under two sequences."""
    if trace.num_sequences < 2:
        return None
    return split_by_sequence(trace, 1.0 - grid.tuning_fraction)


@PREDICTORS.register("bayesian")
class BayesianPredictor(MarginalPredictor):
    """Dirichlet-multinomial popularity per layer with a calibration prior and forgetting.

    Per layer l: prior Dirichlet(alpha0_l) with ``alpha0_l = s * c_l``, where ``c_l`` is the
    training part's add-one-smoothed assignment shares and s the prior strength. Online evidence
    ``n_l`` [E] starts at zero; each window multiplies it by 2^(-W / half_life) and adds the
    window's counts. The posterior is Dirichlet(alpha0_l + n_l); its predictive assignment share
    is the posterior mean. Forgetting lets the posterior follow the current prompts' routing
    (sequences differ in topic; routing has temporal locality) while the prior keeps it sane.

    ``settings=None`` tunes both hyperparameters in ``fit`` over ``grid`` (see :class:`TuningGrid`);
    the resolved values are in ``settings`` afterwards.
    """

    name = "bayesian"

    def __init__(self, settings: BayesianSettings | None = None, grid: TuningGrid | None = None) -> None:
        self.requested_settings = settings
        self.grid = grid if grid is not None else TuningGrid()
        self.settings = settings if settings is not None else DEFAULT_BAYESIAN_SETTINGS
        self._source = "given" if settings is not None else "default"

    def _fit(self, trace: Trace, window: int) -> None:
        if self.requested_settings is None:
            self.settings = self._tune(trace, window)
            self._source = "tuned" if _tuning_split(trace, self.grid) is not None else "default"
        counts = layer_counts(trace.experts, self.num_experts) + 1.0  # [L, E]
        self._prior = self.settings.prior_strength * counts / counts.sum(axis=1, keepdims=True)  # [L, E]
        self._evidence = np.zeros_like(self._prior)  # [L, E]
        self._cached: np.ndarray | None = None

    def _tune(self, trace: Trace, window: int) -> BayesianSettings:
        parts = _tuning_split(trace, self.grid)
        if parts is None:
            return DEFAULT_BAYESIAN_SETTINGS
        calibration, tuning = parts
        best, best_score = DEFAULT_BAYESIAN_SETTINGS, -math.inf
        for strength in self.grid.prior_strengths:
            for half_life in self.grid.half_lives:
                candidate = BayesianSettings(prior_strength=strength, half_life_tokens=half_life)
                predictor = BayesianPredictor(candidate)
                predictor.fit(calibration, window)
                score = held_out_log_likelihood(predictor, tuning.experts, window)
                if score > best_score:
                    best, best_score = candidate, score
        return best

    def _update(self, window: np.ndarray) -> None:
        self._evidence *= _decay(self.settings.half_life_tokens, window.shape[0])
        self._evidence += layer_counts(window, self.num_experts)
        self._cached = None

    def posterior(self) -> np.ndarray:
        """float64 [L, E]: the Dirichlet posterior concentration of every layer."""
        return self._prior + self._evidence

    def probabilities(self) -> np.ndarray:
        if self._cached is None:
            alpha = self.posterior()  # [L, E]
            self._cached = alpha / alpha.sum(axis=1, keepdims=True)
        return self._cached

    def load_concentration(self, layer: int) -> np.ndarray:
        alpha = self.posterior()[layer]  # [E]
        total = float(alpha.sum())
        return _inclusion_concentration(alpha / total, total, self.top_k)

    def settings_dict(self) -> dict[str, float]:
        return {
            "prior_strength": self.settings.prior_strength,
            "half_life_tokens": self.settings.half_life_tokens,
        }

    @property
    def settings_source(self) -> str:
        return self._source


@PREDICTORS.register("bayesian-conditional")
class ConditionalBayesianPredictor(PopularityPredictor):
    """Dirichlet per (layer l, expert j at layer l - 1), backing off to the layer's marginal posterior.

    Row (l, j) has posterior Dirichlet(b * m_l + N_lj): ``m_l`` [E] is the marginal
    :class:`BayesianPredictor`'s current predictive at layer l, b the back-off strength and
    ``N_lj`` [E] transition evidence (tokens at j on layer l - 1 that went to each expert at l).
    ``fit`` sets N to the training part's transition counts; each window multiplies N by
    2^(-W / half_life) and adds the window's. A token whose previous-layer ids are S predicts the
    equal mixture over j in S of the rows' posterior means; at layer 0, or when all of S is
    unknown, it predicts ``m_l``. Without per-token context (``predict_distribution(layer)``,
    ``predict_loads`` without ``previous``) it is the marginal predictor.

    ``settings=None`` tunes back-off strength and half-life in ``fit`` (after the marginal has
    tuned its own, unless ``marginal_settings`` fixes them).
    """

    name = "bayesian-conditional"
    uses_context = True

    def __init__(
        self,
        settings: ConditionalSettings | None = None,
        marginal_settings: BayesianSettings | None = None,
        grid: TuningGrid | None = None,
    ) -> None:
        self.requested_settings = settings
        self.grid = grid if grid is not None else TuningGrid()
        self.settings = settings if settings is not None else DEFAULT_CONDITIONAL_SETTINGS
        self._source = "given" if settings is not None else "default"
        self.marginal = BayesianPredictor(marginal_settings, self.grid)

    def _fit(self, trace: Trace, window: int) -> None:
        self.marginal.fit(trace, window)
        if self.requested_settings is None:
            self.settings = self._tune(trace, window)
            self._source = "tuned" if _tuning_split(trace, self.grid) is not None else "default"
        self._transitions = transition_counts(trace.experts, self.num_experts)  # [L, E, E]
        self._row_totals = self._transitions.sum(axis=2)  # [L, E]

    def _tune(self, trace: Trace, window: int) -> ConditionalSettings:
        parts = _tuning_split(trace, self.grid)
        if parts is None:
            return DEFAULT_CONDITIONAL_SETTINGS
        calibration, tuning = parts

        def score(candidate: ConditionalSettings) -> float:
            predictor = ConditionalBayesianPredictor(candidate, self.marginal.settings)
            predictor.fit(calibration, window)
            return held_out_log_likelihood(predictor, tuning.experts, window)

        # Coordinate search (half-life at the default strength, then strength at that half-life):
        # a full grid costs their product in walks over the tuning part, for the same choice on
        # the traces tried.
        half_life = max(
            self.grid.transition_half_lives,
            key=lambda value: score(
                ConditionalSettings(DEFAULT_CONDITIONAL_SETTINGS.backoff_strength, value)
            ),
        )
        strength = max(
            self.grid.backoff_strengths,
            key=lambda value: score(ConditionalSettings(value, half_life)),
        )
        return ConditionalSettings(backoff_strength=strength, half_life_tokens=half_life)

    def _update(self, window: np.ndarray) -> None:
        self.marginal.update(window)
        decay = _decay(self.settings.half_life_tokens, window.shape[0])
        window_transitions = transition_counts(window, self.num_experts)  # [L, E, E]
        self._transitions *= decay
        self._transitions += window_transitions
        self._row_totals *= decay
        self._row_totals += window_transitions.sum(axis=2)

    def predict_token_distributions(self, layer: int, previous: np.ndarray) -> np.ndarray:
        self._check_layer(layer)
        marginal = self.marginal.probabilities()[layer]  # [E]
        num_tokens = previous.shape[0]
        if layer == 0:
            return np.broadcast_to(marginal, (num_tokens, self.num_experts))
        previous = np.asarray(previous, dtype=np.int64)  # [W, K']
        known = previous != UNKNOWN_EXPERT  # [W, K']
        rows = np.where(known, previous, 0)  # [W, K']
        strength = self.settings.backoff_strength
        alpha = strength * marginal + self._transitions[layer][rows]  # [W, K', E]
        row_means = alpha / (strength + self._row_totals[layer][rows])[..., None]  # [W, K', E]
        mixture_weights = known / np.maximum(known.sum(axis=1, keepdims=True), 1)  # [W, K']
        shares = np.einsum("wj,wje->we", mixture_weights, row_means)  # [W, E]
        no_context = ~known.any(axis=1)  # [W]
        shares[no_context] = marginal
        return shares

    def window_log_likelihood(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Same values as the reference on ``predict_token_distributions``, gathering only the entries used."""
        window = self._checked(window)
        marginal = self.marginal.probabilities()  # [L, E]
        log_sums = np.zeros(self.num_layers)
        assignments = (window != UNKNOWN_EXPERT).sum(axis=(0, 2))  # [L]
        first = window[:, 0, :]  # [W, K]
        log_sums[0] = np.log(marginal[0][first[first != UNKNOWN_EXPERT]]).sum()
        if self.num_layers < 2:
            return log_sums, assignments
        previous, current = window[:, :-1, :], window[:, 1:, :]  # [W, L-1, K] each
        previous_known, current_known = previous != UNKNOWN_EXPERT, current != UNKNOWN_EXPERT
        previous_rows = np.where(previous_known, previous, 0)  # [W, L-1, K]
        current_ids = np.where(current_known, current, 0)  # [W, L-1, K]
        num_experts = self.num_experts
        # Flat indices into the raveled arrays: one np.take is much cheaper than broadcast fancy indexing.
        layer_rows = np.arange(1, self.num_layers)[None, :, None] * num_experts  # [1, L-1, 1]
        current_flat = layer_rows + current_ids  # [W, L-1, K] into [L, E]
        previous_flat = layer_rows + previous_rows  # [W, L-1, K] into [L, E]
        strength = self.settings.backoff_strength
        marginal_current = np.take(marginal, current_flat)  # [W, L-1, K]
        pair_flat = previous_flat[..., :, None] * num_experts + current_ids[..., None, :]  # into [L, E, E]
        evidence = np.take(self._transitions, pair_flat)  # [W, L-1, K(previous), K(current)]
        row_totals = strength + np.take(self._row_totals, previous_flat)  # [W, L-1, K(previous)]
        row_means = (strength * marginal_current[:, :, None, :] + evidence) / row_totals[..., None]
        mixture_weights = previous_known / np.maximum(previous_known.sum(axis=2, keepdims=True), 1)
        shares = np.einsum("wlj,wlje->wle", mixture_weights, row_means)  # [W, L-1, K(current)]
        shares = np.where(previous_known.any(axis=2, keepdims=True), shares, marginal_current)
        log_sums[1:] = np.where(current_known, np.log(shares), 0.0).sum(axis=(0, 2))
        return log_sums, assignments

    def load_concentration(self, layer: int) -> np.ndarray:
        # The mixture has no single Dirichlet; the marginal posterior's uncertainty stands in for it.
        return self.marginal.load_concentration(layer)

    def settings_dict(self) -> dict[str, float]:
        marginal = self.marginal.settings_dict()
        return {
            "prior_strength": marginal["prior_strength"],
            "half_life_tokens": marginal["half_life_tokens"],
            "backoff_strength": self.settings.backoff_strength,
            "transition_half_life_tokens": self.settings.half_life_tokens,
        }

    @property
    def settings_source(self) -> str:
        # "given" only when both parts were given; otherwise whichever part was not.
        sources = {self._source, self.marginal.settings_source}
        return "given" if sources == {"given"} else ("tuned" if "tuned" in sources else "default")


def describe_predictor(predictor: PopularityPredictor) -> dict[str, Any]:
    """Name, resolved hyperparameters ("inf" for math.inf) and their source, as JSON-able values."""
    settings = {
        key: ("inf" if math.isinf(value) else value) for key, value in predictor.settings_dict().items()
    }
    return {"name": predictor.name, "settings": settings, "settings_source": predictor.settings_source}


__all__ = [
    "DEFAULT_BAYESIAN_SETTINGS",
    "DEFAULT_CONDITIONAL_SETTINGS",
    "PREDICTORS",
    "BayesianPredictor",
    "BayesianSettings",
    "ConditionalBayesianPredictor",
    "ConditionalSettings",
    "FrequencyPredictor",
    "LoadForecast",
    "MarginalPredictor",
    "PopularityPredictor",
    "TuningGrid",
    "UniformPredictor",
    "describe_predictor",
    "forecast_loads",
    "held_out_log_likelihood",
    "layer_counts",
    "split_by_sequence",
    "transition_counts",
]
