"""Reveal and revise: find the artifacts a model relies on, correct the model, measure the change
(Pahde et al., "Reveal to Revise: An Explainable AI Life Cycle for Iterative Bias Correction of
Deep Models", MICCAI 2023). :mod:`~harness.revise.spray` reveals by clustering heatmaps,
:mod:`~harness.revise.clarc` corrects (P-ClArC, RR-ClArC)."""
