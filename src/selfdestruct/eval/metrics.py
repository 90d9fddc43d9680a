"""torchmetrics objects for evaluation; a fresh collection per stage so pre and post never mix."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric, Metric, MetricCollection


class DistinctN(Metric):
    """Corpus-level distinct-n: unique n-grams over all n-grams of every generation (low = repetitive)."""

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.n = n
        self.add_state("ngrams", default=[], dist_reduce_fx="cat")

    def update(self, token_lists: list[list[int]]) -> None:
        hashes = [hash(tuple(t[i:i + self.n])) for t in token_lists for i in range(len(t) - self.n + 1)]
        if hashes:
            self.ngrams.append(torch.tensor(hashes, dtype=torch.long))

    def compute(self) -> torch.Tensor:
        if isinstance(self.ngrams, torch.Tensor):
            allgrams = self.ngrams
        elif self.ngrams:
            allgrams = torch.cat(self.ngrams)
        else:
            return torch.tensor(0.0)
        return torch.tensor(allgrams.unique().numel() / max(1, allgrams.numel()))


def repetition_rate(tokens: list[int], n: int = 2) -> float:
    """Fraction of a generation's n-grams that already occurred earlier in it (degenerate loops → 1)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def evaluation_metrics() -> MetricCollection:
    """Every number one evaluation reports; rates are means of 0/1 indicators."""
    return MetricCollection({
        "harmful_score": MeanMetric(),
        "refusal_rate": MeanMetric(),
        "other_rate": MeanMetric(),
        "keyword_harmful_score": MeanMetric(),
        "utility": MeanMetric(),
        "task_accuracy": MeanMetric(),
        "nll": MeanMetric(),
        "distinct_2": DistinctN(2),
        "repetition_rate": MeanMetric(),
        "collapse_token_rate": MeanMetric(),  # share of collapse tokens in the answers to harmful prompts
        "collapse_token_rate_benign": MeanMetric(),  # ... and in the answers to the benign tasks
        "response_length": MeanMetric(),
    })
