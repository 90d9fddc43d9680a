"""The one record type every data source produces, synthetic or real, and the held-out sets made of it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """A prompt with its response.

    ``response`` is what the model is trained to say (a harmful completion for D_adv, a refusal for
    D_aln, an answer for benign data); ``refusal`` is the paired refusal when the source has one;
    ``category`` is the harm category or the benign task family; ``answer`` is the exactly checkable
    answer of a benign task (used by the utility metric), ``None`` when there is none.
    """

    prompt: str
    response: str
    category: str = ""
    refusal: str | None = None
    answer: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class EvalSets:
    """Held-out data: harmful prompts, benign tasks (utility), the fine-tune task, general text."""

    harmful: list[Example]
    benign: list[Example]
    general: list[Example]
    finetune: list[Example] = field(default_factory=list)

    def limited(self, n: int | None) -> "EvalSets":
        """At most ``n`` examples per set, evenly spaced so every task family stays represented (smoke tests)."""
        if not n:
            return self

        def spread(items: list[Example]) -> list[Example]:
            if len(items) <= n:
                return items
            return [items[int(i * len(items) / n)] for i in range(n)]

        return EvalSets(spread(self.harmful), spread(self.benign), spread(self.general), spread(self.finetune))
