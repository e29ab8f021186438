"""Expert-popularity predictors and their held-out evaluation (see ``popularity`` and ``evaluate``)."""
