"""Attribution metrics: ``metric(model, x, attributions, targets, masks) -> MetricOutput``."""
