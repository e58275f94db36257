"""Classifiers: every builder returns a :class:`harness.models.classifier.Classifier`."""
