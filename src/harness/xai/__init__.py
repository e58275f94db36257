"""Explainers: ``explainer(model, inputs, targets) -> np.ndarray [N, H, W]``."""
