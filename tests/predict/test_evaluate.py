"""Held-out evaluation: figures on a hand-made trace, who wins on drifting routing, the real trace."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moeserve.predict.evaluate import evaluate_predictors
from moeserve.predict.popularity import (
    BayesianPredictor,
    BayesianSettings,
    ConditionalBayesianPredictor,
    ConditionalSettings,
    FrequencyPredictor,
    TuningGrid,
    UniformPredictor,
)
from moeserve.traces.format import Trace, load_trace

from .test_popularity import drifting_trace, make_trace

SMALL_GRID = TuningGrid(
    prior_strengths=(10.0, 100.0),
    half_lives=(16.0, math.inf),
    backoff_strengths=(1.0,),
    transition_half_lives=(32.0, math.inf),
)


def two_sequence_trace() -> Trace:
    """E=4, K=2, L=1. Training sequence: {0,1} x 2. Held-out sequence: {0,1} {2,3} {0,2}."""
    return make_trace(
        experts=[[[0, 1]], [[0, 1]], [[0, 1]], [[2, 3]], [[0, 2]]],
        offsets=[0, 2, 5],
        num_experts=4,
        top_k=2,
    )


def test_figures_on_a_hand_made_trace():
    evaluation = evaluate_predictors(
        two_sequence_trace(), window=2, predictors=["uniform", "frequency"], quantiles=(0.5,)
    )
    assert (evaluation.train_tokens, evaluation.held_out_tokens, evaluation.windows) == (2, 3, 2)
    uniform = evaluation.scores("uniform")
    assert uniform.log_likelihood == pytest.approx(-math.log(4))
    assert uniform.perplexity == pytest.approx(4.0)
    # Ties rank the lower ids first: top-2 is {0, 1}; held-out assignments 0,1,2,3,0,2 -> 3 hits.
    assert uniform.top_k_recall == pytest.approx(3 / 6)
    # Window 1 (2 tokens): expected 1 per expert, actual (1,1,1,1) -> 0. Window 2 (1 token):
    # expected 0.5 each, actual (1,0,1,0) -> mean |error| 0.5, / 1 token.
    assert uniform.load_error == pytest.approx((0.0 + 0.5) / 2)
    frequency = evaluation.scores("frequency")
    # Window 1 predicted from training counts (2,2,0,0) + 1 = (3,3,1,1)/8.
    window_1 = 2 * math.log(3 / 8) + 2 * math.log(1 / 8)
    # Window 2 from counts (3,3,1,1) + 1 = (4,4,2,2)/12 after window 1; scores ids 0 and 2.
    window_2 = math.log(4 / 12) + math.log(2 / 12)
    assert frequency.log_likelihood == pytest.approx((window_1 + window_2) / 6)
    assert frequency.top_k_recall == pytest.approx((2 + 1) / 6)
    assert frequency.layers[0].log_likelihood == pytest.approx(frequency.log_likelihood)


def test_bayesian_beats_frequency_and_context_beats_both_on_drifting_routing():
    trace = drifting_trace(num_sequences=24, tokens_per_sequence=48, seed=7)
    evaluation = evaluate_predictors(
        trace,
        window=16,
        predictors=[
            UniformPredictor(),
            FrequencyPredictor(),
            BayesianPredictor(grid=SMALL_GRID),
            ConditionalBayesianPredictor(grid=SMALL_GRID),
        ],
    )
    uniform, frequency, bayesian, conditional = evaluation.predictors
    assert bayesian.settings_source == "tuned"
    assert bayesian.settings["half_life_tokens"] == 16.0  # forgetting pays on drifting topics
    # Training topics differ from held-out ones: cumulative counts fall below uniform; forgetting does not.
    assert bayesian.log_likelihood > uniform.log_likelihood > frequency.log_likelihood
    assert bayesian.top_k_recall > frequency.top_k_recall
    assert bayesian.load_error < frequency.load_error
    assert conditional.log_likelihood > bayesian.log_likelihood
    assert conditional.top_k_recall > bayesian.top_k_recall
    # Layer 0 has no previous layer: the conditional predictor is its marginal there.
    assert conditional.layers[0].log_likelihood == pytest.approx(bayesian.layers[0].log_likelihood)


class RecordingPredictor(UniformPredictor):
    """A uniform predictor that checks every window is scored before it is learned."""

    def _fit(self, trace: Trace, window: int) -> None:
        super()._fit(trace, window)
        self.seen_rows = 0
        self.scored_rows: list[int] = []

    def window_log_likelihood(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.scored_rows.append(self.seen_rows)
        return super().window_log_likelihood(window)

    def _update(self, window: np.ndarray) -> None:
        self.seen_rows += window.shape[0]


def test_each_window_is_predicted_before_the_update():
    predictor = RecordingPredictor()
    evaluate_predictors(drifting_trace(4, 10, seed=0), window=4, predictors=[predictor])
    assert predictor.scored_rows == [0, 4, 8, 12, 16]  # 20 held-out tokens in windows of 4


def test_report_is_json_and_a_table():
    evaluation = evaluate_predictors(
        drifting_trace(6, 12, seed=2),
        window=8,
        predictors=["uniform", BayesianPredictor(BayesianSettings(10.0, 16.0))],
    )
    document = json.loads(json.dumps(evaluation.to_dict()))
    assert [entry["name"] for entry in document["predictors"]] == ["uniform", "bayesian"]
    assert document["predictors"][1]["settings"] == {"prior_strength": 10.0, "half_life_tokens": 16.0}
    assert document["predictors"][1]["settings_source"] == "given"
    assert len(document["predictors"][0]["layers"]) == 3
    assert document["uniform_log_likelihood"] == pytest.approx(-math.log(16))
    assert evaluation.render_table().row_count == 2
    assert evaluation.render_table(per_layer=True).row_count == 3
    with pytest.raises(KeyError, match="evaluated: uniform, bayesian"):
        evaluation.scores("frequency")


def test_bad_arguments_raise():
    trace = two_sequence_trace()
    with pytest.raises(ValueError, match="window"):
        evaluate_predictors(trace, window=0)
    with pytest.raises(ValueError, match=r"top_k for recall must be in \[1, 4\]"):
        evaluate_predictors(trace, top_k=5)
    with pytest.raises(ValueError, match="1 sequence"):
        evaluate_predictors(make_trace([[[0, 1]]], offsets=[0, 1], num_experts=4, top_k=2))
    with pytest.raises(KeyError, match="unknown popularity predictor"):
        evaluate_predictors(trace, predictors=["oracle"])


def test_bayesian_beats_frequency_on_the_deepseek_trace(shared_dir):
    """A fast slice of the bar (the first 60 prompts, fixed settings, 8 of 26 layers); the full
    tuned run is ``evaluate_predictors(load_trace(path), train_fraction=0.5)``."""
    full = load_trace(shared_dir / "traces" / "deepseek-v2-lite-puffin-a.npz")
    cut = int(full.offsets[60])
    trace = Trace(experts=full.experts[:cut, :8], offsets=full.offsets[:61], meta=full.meta)
    evaluation = evaluate_predictors(
        trace,
        predictors=[
            FrequencyPredictor(),
            BayesianPredictor(BayesianSettings(prior_strength=300.0, half_life_tokens=64.0)),
            ConditionalBayesianPredictor(ConditionalSettings(1.0, 128.0), BayesianSettings(300.0, 64.0)),
        ],
    )
    frequency, bayesian, conditional = evaluation.predictors
    assert bayesian.log_likelihood > frequency.log_likelihood
    assert bayesian.top_k_recall > frequency.top_k_recall
    assert conditional.log_likelihood > bayesian.log_likelihood
    assert conditional.top_k_recall > bayesian.top_k_recall
