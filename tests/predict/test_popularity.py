"""Popularity predictors on hand-made traces whose posteriors are known, and their load forecasts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeserve.predict.popularity import (
    PREDICTORS,
    BayesianPredictor,
    BayesianSettings,
    ConditionalBayesianPredictor,
    ConditionalSettings,
    FrequencyPredictor,
    PopularityPredictor,
    TuningGrid,
    UniformPredictor,
    describe_predictor,
    forecast_loads,
    held_out_log_likelihood,
    layer_counts,
    split_by_sequence,
    transition_counts,
)
from moeserve.traces.format import Trace, TraceMeta


def make_trace(experts: list | np.ndarray, offsets: list[int], num_experts: int, top_k: int) -> Trace:
    meta = TraceMeta(
        model="test/tiny", num_experts=num_experts, top_k=top_k, phase="decode", source="unit test"
    )
    return Trace(
        experts=np.asarray(experts, dtype=np.int16), offsets=np.asarray(offsets, dtype=np.int64), meta=meta
    )


def hand_made_trace() -> Trace:
    """E=4, K=2, L=2; sequence A has 3 tokens, sequence B has 2.

    Layer 0:  A: {0,1} {0,2} {0,1}   B: {3,-} {0,1}
    Layer 1:  A: {2,3} {2,-} {3,2}   B: {1,0} {-,-}
    Layer-0 counts: e0=4, e1=3, e2=1, e3=1 (9 known). Layer-1 counts: e0=1, e1=1, e2=3, e3=2 (7 known).
    """
    return make_trace(
        experts=[
            [[0, 1], [2, 3]],
            [[0, 2], [2, -1]],
            [[0, 1], [3, 2]],
            [[3, -1], [1, 0]],
            [[0, 1], [-1, -1]],
        ],
        offsets=[0, 3, 5],
        num_experts=4,
        top_k=2,
    )


def window(rows: list) -> np.ndarray:
    return np.asarray(rows, dtype=np.int64)


# -- counting and splitting ----------------------------------------------------------------------


def test_layer_counts_skip_unknown_ids():
    counts = layer_counts(hand_made_trace().experts, 4)
    np.testing.assert_array_equal(counts, [[4, 3, 1, 1], [1, 1, 3, 2]])


def test_transition_counts_pair_previous_and_current_ids():
    counts = transition_counts(hand_made_trace().experts, 4)
    assert counts.shape == (2, 4, 4)
    assert not counts[0].any()
    expected = np.zeros((4, 4))
    # token rows (layer-0 ids -> layer-1 ids): {0,1}->{2,3}, {0,2}->{2}, {0,1}->{3,2}, {3}->{1,0}, {0,1}->{}
    for previous, current in [((0, 1), (2, 3)), ((0, 2), (2,)), ((0, 1), (3, 2)), ((3,), (1, 0))]:
        for j in previous:
            for e in current:
                expected[j, e] += 1
    np.testing.assert_array_equal(counts[1], expected)


def test_split_by_sequence_rebases_offsets_and_shares_arrays():
    trace = make_trace(np.zeros((10, 1, 1)), offsets=[0, 2, 5, 9, 10], num_experts=2, top_k=1)
    first, rest = split_by_sequence(trace, 0.5)
    assert (first.num_sequences, rest.num_sequences) == (2, 2)
    np.testing.assert_array_equal(first.offsets, [0, 2, 5])
    np.testing.assert_array_equal(rest.offsets, [0, 4, 5])
    assert np.shares_memory(rest.experts, trace.experts)
    # Each part keeps at least one sequence however small or large the fraction.
    assert split_by_sequence(trace, 0.01)[0].num_sequences == 1
    assert split_by_sequence(trace, 0.99)[1].num_sequences == 1


def test_split_by_sequence_rejects_what_cannot_be_split():
    one_sequence = make_trace(np.zeros((3, 1, 1)), offsets=[0, 3], num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="1 sequence"):
        split_by_sequence(one_sequence, 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        split_by_sequence(hand_made_trace(), 1.0)


# -- registry and protocol -----------------------------------------------------------------------


def test_registry_names_every_predictor():
    assert PREDICTORS.names() == ["bayesian", "bayesian-conditional", "frequency", "uniform"]
    with pytest.raises(KeyError, match="known: bayesian, bayesian-conditional, frequency, uniform"):
        PREDICTORS.get("oracle")


@pytest.mark.parametrize("name", ["uniform", "frequency", "bayesian", "bayesian-conditional"])
def test_update_rejects_malformed_windows(name):
    predictor = PREDICTORS.get(name)()
    predictor.fit(hand_made_trace())
    with pytest.raises(ValueError, match=r"shape \[W, 2, 2\]"):
        predictor.update(np.zeros((3, 2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 4\) or -1"):
        predictor.update(window([[[0, 4], [1, 2]]]))
    with pytest.raises(ValueError, match="layer 2 out of range"):
        predictor.predict_distribution(2)


def test_uniform_predicts_one_over_e():
    predictor = UniformPredictor()
    predictor.fit(hand_made_trace())
    np.testing.assert_allclose(predictor.predict_distribution(1), [0.25] * 4)
    log_sums, assignments = predictor.window_log_likelihood(hand_made_trace().experts)
    np.testing.assert_array_equal(assignments, [9, 7])
    np.testing.assert_allclose(log_sums, [9 * math.log(0.25), 7 * math.log(0.25)])


def test_frequency_is_add_one_smoothed_cumulative_counts():
    predictor = FrequencyPredictor()
    predictor.fit(hand_made_trace())
    np.testing.assert_allclose(predictor.predict_distribution(0), np.array([5, 4, 2, 2]) / 13)
    predictor.update(window([[[3, 2], [0, 1]], [[3, -1], [0, -1]]]))
    np.testing.assert_allclose(predictor.predict_distribution(0), np.array([5, 4, 3, 4]) / 16)
    np.testing.assert_allclose(predictor.predict_distribution(1), np.array([4, 3, 4, 3]) / 14)


# -- Bayesian ------------------------------------------------------------------------------------


def test_bayesian_prior_is_calibration_shares_scaled_by_strength():
    predictor = BayesianPredictor(BayesianSettings(prior_strength=13.0, half_life_tokens=math.inf))
    predictor.fit(hand_made_trace())
    # Layer 0 smoothed counts 5, 4, 2, 2 (sum 13): with strength 13 the prior is exactly those.
    np.testing.assert_allclose(predictor.posterior()[0], [5, 4, 2, 2])
    np.testing.assert_allclose(predictor.predict_distribution(0), np.array([5, 4, 2, 2]) / 13)


def test_bayesian_posterior_forgets_old_evidence_by_half_life():
    predictor = BayesianPredictor(BayesianSettings(prior_strength=13.0, half_life_tokens=2.0))
    predictor.fit(hand_made_trace())
    first = window([[[3, 2], [0, 1]], [[3, -1], [0, -1]]])  # 2 tokens: layer-0 counts 0, 0, 1, 2
    second = window([[[1, -1], [0, 1]]])  # 1 token: layer-0 counts 0, 1, 0, 0
    predictor.update(first)
    np.testing.assert_allclose(predictor.posterior()[0], np.array([5, 4, 2, 2]) + [0, 0, 1, 2])
    predictor.update(second)
    # The first window's evidence decays by 2^(-1 token / 2 tokens) when the second arrives.
    evidence = np.sqrt(0.5) * np.array([0, 0, 1, 2]) + [0, 1, 0, 0]
    alpha = np.array([5, 4, 2, 2]) + evidence
    np.testing.assert_allclose(predictor.posterior()[0], alpha)
    np.testing.assert_allclose(predictor.predict_distribution(0), alpha / alpha.sum())


def test_bayesian_without_forgetting_and_a_flat_prior_is_the_frequency_predictor():
    trace = hand_made_trace()
    frequency, bayesian = FrequencyPredictor(), BayesianPredictor(BayesianSettings(13.0, math.inf))
    frequency.fit(trace)
    bayesian.fit(trace)
    update = window([[[3, 2], [0, 1]], [[3, -1], [0, -1]]])
    frequency.update(update)
    bayesian.update(update)
    # Prior strength = smoothed training total makes the prior equal to add-one counts (layer 0).
    np.testing.assert_allclose(bayesian.predict_distribution(0), frequency.predict_distribution(0))


def test_bayesian_tuning_finds_forgetting_on_drifting_routing():
    trace = drifting_trace(num_sequences=12, tokens_per_sequence=32, seed=1)
    grid = TuningGrid(prior_strengths=(30.0,), half_lives=(16.0, math.inf))
    predictor = BayesianPredictor(grid=grid)
    predictor.fit(trace, window=8)
    assert predictor.settings == BayesianSettings(prior_strength=30.0, half_life_tokens=16.0)
    assert describe_predictor(predictor) == {
        "name": "bayesian",
        "settings": {"prior_strength": 30.0, "half_life_tokens": 16.0},
        "settings_source": "tuned",
    }


def test_bayesian_falls_back_to_defaults_when_training_has_one_sequence():
    predictor = BayesianPredictor()
    predictor.fit(make_trace([[[0]], [[1]]], offsets=[0, 2], num_experts=2, top_k=1))
    assert predictor.settings_source == "default"


def test_settings_reject_non_positive_values():
    with pytest.raises(ValueError, match="prior_strength"):
        BayesianSettings(prior_strength=0.0, half_life_tokens=1.0)
    with pytest.raises(ValueError, match="half_life_tokens"):
        ConditionalSettings(backoff_strength=1.0, half_life_tokens=-1.0)
    with pytest.raises(ValueError, match="tuning_fraction"):
        TuningGrid(tuning_fraction=1.0)


# -- conditional ---------------------------------------------------------------------------------


def conditional_on_hand_made_trace(backoff: float = 2.0) -> ConditionalBayesianPredictor:
    predictor = ConditionalBayesianPredictor(
        ConditionalSettings(backoff_strength=backoff, half_life_tokens=math.inf),
        BayesianSettings(prior_strength=11.0, half_life_tokens=math.inf),
    )
    predictor.fit(hand_made_trace())
    return predictor


def test_conditional_mixes_rows_of_the_previous_layer_experts():
    predictor = conditional_on_hand_made_trace(backoff=2.0)
    marginal = predictor.marginal.predict_distribution(1)  # layer-1 smoothed counts 2, 2, 4, 3 / 11
    np.testing.assert_allclose(marginal, np.array([2, 2, 4, 3]) / 11)
    transitions = transition_counts(hand_made_trace().experts, 4)[1]  # [j, e]
    row = {j: (2.0 * marginal + transitions[j]) / (2.0 + transitions[j].sum()) for j in range(4)}
    np.testing.assert_allclose(predictor.predict_distribution(1, np.array([0, 3])), (row[0] + row[3]) / 2)
    # Unknown ids drop out of the mixture; no known id, no context, or layer 0: the marginal.
    np.testing.assert_allclose(predictor.predict_distribution(1, np.array([-1, 3])), row[3])
    np.testing.assert_allclose(predictor.predict_distribution(1, np.array([-1, -1])), marginal)
    np.testing.assert_allclose(predictor.predict_distribution(1), marginal)
    np.testing.assert_allclose(
        predictor.predict_distribution(0, np.array([1, 2])), predictor.marginal.predict_distribution(0)
    )


def test_conditional_update_decays_transitions():
    predictor = ConditionalBayesianPredictor(
        ConditionalSettings(backoff_strength=1.0, half_life_tokens=1.0),
        BayesianSettings(prior_strength=11.0, half_life_tokens=math.inf),
    )
    predictor.fit(hand_made_trace())
    before = transition_counts(hand_made_trace().experts, 4)
    update = window([[[3, 2], [0, 1]], [[3, -1], [0, -1]]])
    predictor.update(update)
    expected = 0.25 * before + transition_counts(update, 4)  # 2 tokens at a 1-token half-life
    np.testing.assert_allclose(predictor._transitions, expected)


@pytest.mark.parametrize("name", ["uniform", "frequency", "bayesian", "bayesian-conditional"])
def test_fast_window_log_likelihood_matches_the_reference(name):
    trace = drifting_trace(num_sequences=6, tokens_per_sequence=20, seed=3, unknown_share=0.1)
    predictor = PREDICTORS.get(name)()
    if isinstance(predictor, ConditionalBayesianPredictor):
        predictor = ConditionalBayesianPredictor(ConditionalSettings(0.5, 16.0), BayesianSettings(20.0, 8.0))
    elif isinstance(predictor, BayesianPredictor):
        predictor = BayesianPredictor(BayesianSettings(20.0, 8.0))
    train, held_out = split_by_sequence(trace, 0.5)
    predictor.fit(train, window=8)
    for start in range(0, held_out.num_tokens, 8):
        chunk = held_out.experts[start : start + 8]
        fast = predictor.window_log_likelihood(chunk)
        reference = PopularityPredictor.window_log_likelihood(predictor, chunk)
        np.testing.assert_allclose(fast[0], reference[0], rtol=1e-12)
        np.testing.assert_array_equal(fast[1], reference[1])
        predictor.update(chunk)


def test_held_out_log_likelihood_scores_before_updating():
    # Two identical windows: scored before its update, the first sees only the prior.
    trace = make_trace([[[0]]] * 4, offsets=[0, 2, 4], num_experts=2, top_k=1)
    predictor = BayesianPredictor(BayesianSettings(prior_strength=2.0, half_life_tokens=math.inf))
    predictor.fit(make_trace([[[1]]], offsets=[0, 1], num_experts=2, top_k=1))
    # prior: smoothed counts (1, 2) scaled to strength 2 -> (2/3, 4/3)
    score = held_out_log_likelihood(predictor, trace.experts, window=2)
    first = 2 * math.log((2 / 3) / 2)
    second = 2 * math.log((2 / 3 + 2) / 4)
    assert score == pytest.approx((first + second) / 4)


# -- load forecasts ------------------------------------------------------------------------------


def test_binomial_quantiles_match_exact_cdf():
    forecast = forecast_loads(
        np.array([0.2, 0.5]), window_tokens=10, concentration=math.inf, levels=(0.5, 0.9)
    )
    np.testing.assert_allclose(forecast.expected, [2.0, 5.0])
    for column, p in enumerate([0.2, 0.5]):
        cdf = np.cumsum([math.comb(10, k) * p**k * (1 - p) ** (10 - k) for k in range(11)])
        for row, level in enumerate((0.5, 0.9)):
            assert forecast.quantiles[row, column] == int(np.argmax(cdf >= level))


def test_beta_binomial_quantiles_match_exact_cdf():
    inclusion, concentration, trials = 0.3, 4.0, 12
    alpha, beta = inclusion * concentration, (1 - inclusion) * concentration

    def log_beta(a: float, b: float) -> float:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    mass = [
        math.comb(trials, k) * math.exp(log_beta(k + alpha, trials - k + beta) - log_beta(alpha, beta))
        for k in range(trials + 1)
    ]
    cdf = np.cumsum(mass)
    forecast = forecast_loads(
        np.array([inclusion]), trials, np.array([concentration]), levels=(0.1, 0.5, 0.99)
    )
    for row, level in enumerate((0.1, 0.5, 0.99)):
        assert forecast.quantiles[row, 0] == int(np.argmax(cdf >= level))
    # Uncertainty about the inclusion probability widens the forecast.
    point = forecast_loads(np.array([inclusion]), trials, math.inf, levels=(0.99,))
    assert forecast.quantiles[2, 0] > point.quantiles[0, 0]


def test_load_forecast_edges_and_batches():
    forecast = forecast_loads(np.array([[0.0, 1.0], [0.5, 0.5]]), window_tokens=4, concentration=math.inf)
    assert forecast.quantiles.shape == (3, 2, 2)
    np.testing.assert_array_equal(forecast.quantiles[:, 0, 0], [0, 0, 0])
    np.testing.assert_array_equal(forecast.quantiles[:, 0, 1], [4, 4, 4])
    np.testing.assert_array_equal(forecast.quantiles[0, 1], [2, 2])  # median of Binomial(4, 0.5)
    with pytest.raises(ValueError, match="quantile levels"):
        forecast_loads(np.array([0.5]), 4, math.inf, levels=(1.0,))


def test_predict_loads_expects_k_experts_per_token():
    predictor = BayesianPredictor(BayesianSettings(prior_strength=11.0, half_life_tokens=math.inf))
    predictor.fit(hand_made_trace())
    forecast = predictor.predict_loads(1, window_tokens=10)
    np.testing.assert_allclose(forecast.expected, 10 * 2 * np.array([2, 2, 4, 3]) / 11)
    assert forecast.expected.sum() == pytest.approx(20.0)
    assert (np.diff(forecast.quantiles, axis=0) >= 0).all()
    conditional = conditional_on_hand_made_trace()
    previous = np.array([[0, 1], [3, -1], [-1, -1]])
    with_context = conditional.predict_loads(1, window_tokens=3, previous=previous)
    shares = np.stack([conditional.predict_distribution(1, row) for row in previous])
    np.testing.assert_allclose(with_context.expected, np.minimum(1.0, 2 * shares).sum(axis=0))


# -- synthetic routing ---------------------------------------------------------------------------


def drifting_trace(
    num_sequences: int,
    tokens_per_sequence: int,
    seed: int,
    num_experts: int = 16,
    num_layers: int = 3,
    unknown_share: float = 0.0,
) -> Trace:
    """Top-2 routing whose hot experts change with every sequence (a topic), and whose layer l
    ids follow layer l-1 ids through a fixed permutation most of the time."""
    rng = np.random.default_rng(seed)
    permutation = rng.permutation(num_experts)
    rows = []
    for _ in range(num_sequences):
        hot = rng.choice(num_experts, size=3, replace=False)
        for _ in range(tokens_per_sequence):
            token = np.empty((num_layers, 2), dtype=np.int64)
            token[0] = (
                rng.choice(hot, size=2, replace=False)
                if rng.random() < 0.9
                else rng.choice(num_experts, size=2, replace=False)
            )
            for layer in range(1, num_layers):
                follow = permutation[token[layer - 1]]
                token[layer] = (
                    follow if rng.random() < 0.8 else rng.choice(num_experts, size=2, replace=False)
                )
            rows.append(token)
    experts = np.stack(rows)
    experts[rng.random(experts.shape) < unknown_share] = -1
    offsets = np.arange(num_sequences + 1) * tokens_per_sequence
    return make_trace(experts, list(offsets), num_experts=num_experts, top_k=2)
