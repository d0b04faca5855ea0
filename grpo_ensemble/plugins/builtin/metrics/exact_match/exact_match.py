"""`exact_match` as an `evaluate` metric module, loadable offline by its folder's path: the
share of predictions equal to their reference, after optional normalisation."""

import re
import string

import datasets
import evaluate

_DESCRIPTION = "Share of predictions that equal their reference (1.0 each, else 0.0), averaged."

_KWARGS = """
Args:
    predictions: list of strings.
    references: list of strings, one per prediction.
    regexes_to_ignore: patterns removed from both before comparing.
    ignore_case: compare case-folded.
    ignore_punctuation: drop ASCII punctuation before comparing.
    ignore_numbers: drop digits before comparing.
    strip: compare with surrounding whitespace removed (default True).
Returns:
    exact_match: the mean of the per-pair matches, in [0, 1].
"""


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        regexes_to_ignore=None,
        ignore_case=False,
        ignore_punctuation=False,
        ignore_numbers=False,
        strip=True,
    ):
        def norm(text: str) -> str:
            for pattern in regexes_to_ignore or ():
                text = re.sub(pattern, "", text)
            if ignore_case:
                text = text.casefold()
            if ignore_punctuation:
                text = text.translate(str.maketrans("", "", string.punctuation))
            if ignore_numbers:
                text = text.translate(str.maketrans("", "", string.digits))
            return text.strip() if strip else text

        pairs = list(zip(predictions, references, strict=True))
        matches = [float(norm(p) == norm(r)) for p, r in pairs]
        return {"exact_match": sum(matches) / len(matches) if matches else 0.0}
