"""Scores for the MLLM's answers: consistency, readability, grounding, judge; and the XAI
sensitivity statistic over a finished sweep."""
