"""Evaluation before and after every attack: harmful score, utility, perplexity and coherence (SPEC §5)."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from rich.progress import Progress

from selfdestruct.data.formatting import PromptFormat, collate, encode_example, encode_prompts
from selfdestruct.data.records import EvalSets, Example
from selfdestruct.data.synthetic import task_answer_correct
from selfdestruct.eval.judges import KeywordJudge
from selfdestruct.eval.metrics import evaluation_metrics, repetition_rate

log = logging.getLogger(__name__)


@torch.no_grad()
def token_nll(model, tokenizer, examples: list[Example], fmt: PromptFormat, max_length: int,
              batch_size: int) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ``examples`` (all their labelled tokens) and the count."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        feats = [encode_example(tokenizer, ex, max_length, fmt) for ex in examples[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(feats, tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                reduction="sum")
        total += nll.item()
        count += int((targets != -100).sum())
    return total, count


def judge_all(judge, prompts: list[str], generations: list[str]) -> list[str]:
    """One verdict per generation; batched judges (a classifier, a chat API) see each prompt with its answer."""
    if hasattr(judge, "verdicts"):
        return list(judge.verdicts(prompts, generations))
    return [judge.verdict(text) for text in generations]


@dataclass
class Evaluator:
    """Greedy generations judged by ``judge``; utility by exact match; perplexity on general text."""

    tokenizer: object
    sets: EvalSets
    judge: object
    max_new_tokens: int = 64
    batch_size: int = 64
    max_length: int = 128
    collapse_token_id: int | None = None
    fmt: PromptFormat = field(default_factory=PromptFormat)
    show_progress: bool = True
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    device: str | None = None  # where the model is evaluated (moved there and back); None: where it is

    @torch.no_grad()
    def generate(self, model, prompts: list[str]) -> tuple[list[str], list[list[int]]]:
        """Greedy continuations of ``prompts`` (texts and token ids, special tokens dropped)."""
        texts, token_lists = [], []
        device = next(model.parameters()).device
        old_side = self.tokenizer.padding_side
        for start in range(0, len(prompts), self.batch_size):
            batch = encode_prompts(self.tokenizer, prompts[start:start + self.batch_size], self.fmt)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                 pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                if self.tokenizer.eos_token_id in row:
                    row = row[:row.index(self.tokenizer.eos_token_id)]
                row = [t for t in row if t != self.tokenizer.pad_token_id]
                token_lists.append(row)
                texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        self.tokenizer.padding_side = old_side
        return texts, token_lists

    def collapse_share(self, tokens: list[int]) -> float:
        """Share of ``tokens`` equal to the collapse token (0 for an empty generation)."""
        return sum(t == self.collapse_token_id for t in tokens) / max(1, len(tokens))

    def token_nll(self, model, examples: list[Example]) -> tuple[float, int]:
        """Summed next-token negative log-likelihood of ``examples`` (all their labelled tokens) and the count."""
        return token_nll(model, self.tokenizer, examples, self.fmt, self.max_length, self.batch_size)

    def __call__(self, model, stage: str) -> tuple[dict[str, float], dict[str, list]]:
        """Evaluate ``model`` on :attr:`device`; returns the flat metric dict and the raw generations."""
        home = next(model.parameters()).device
        target = torch.device(self.device) if self.device else home
        if target == home:
            return self._evaluate(model, stage)
        model.to(target)
        try:
            return self._evaluate(model, stage)
        finally:
            model.to(home)

    def _evaluate(self, model, stage: str) -> tuple[dict[str, float], dict[str, list]]:
        was_training = model.training
        model.eval()
        metrics = evaluation_metrics()
        keyword = KeywordJudge()
        samples: dict[str, list] = {}
        per_family: dict[str, list[float]] = defaultdict(list)
        with Progress(transient=True, disable=not self.show_progress) as progress:
            task = progress.add_task(f"evaluating ({stage})", total=4)
            prompts = [ex.prompt for ex in self.sets.harmful]
            texts, tokens = self.generate(model, prompts)
            verdicts = judge_all(self.judge, prompts, texts)
            for text, toks, verdict in zip(texts, tokens, verdicts):
                metrics["harmful_score"].update(float(verdict == "harmful"))
                metrics["refusal_rate"].update(float(verdict == "refusal"))
                metrics["other_rate"].update(float(verdict == "other"))
                metrics["keyword_harmful_score"].update(float(keyword.verdict(text) == "harmful"))
                metrics["repetition_rate"].update(repetition_rate(toks))
                metrics["response_length"].update(float(len(toks)))
                if self.collapse_token_id is not None:
                    metrics["collapse_token_rate"].update(self.collapse_share(toks))
            metrics["distinct_2"].update(tokens)
            samples["harmful"] = [{"prompt": p, "generation": t, "verdict": v}
                                  for p, t, v in zip(prompts, texts, verdicts)]
            progress.advance(task)

            texts, tokens = self.generate(model, [ex.prompt for ex in self.sets.benign])
            for ex, text, toks in zip(self.sets.benign, texts, tokens):
                ok = float(task_answer_correct(text, ex.answer or ex.response))
                metrics["utility"].update(ok)
                if self.collapse_token_id is not None:  # CTRAP plants its collapse on benign data: count it there too
                    metrics["collapse_token_rate_benign"].update(self.collapse_share(toks))
                per_family[ex.category].append(ok)
            samples["benign"] = [{"prompt": ex.prompt, "generation": t, "answer": ex.answer}
                                 for ex, t in zip(self.sets.benign, texts)]
            progress.advance(task)

            if self.sets.finetune:
                texts, _ = self.generate(model, [ex.prompt for ex in self.sets.finetune])
                for ex, text in zip(self.sets.finetune, texts):
                    metrics["task_accuracy"].update(float(task_answer_correct(text, ex.answer or ex.response)))
            progress.advance(task)

            total, count = self.token_nll(model, self.sets.general)
            metrics["nll"].update(total / max(1, count))
            progress.advance(task)

        unused = {"collapse_token_rate": self.collapse_token_id is None, "task_accuracy": not self.sets.finetune,
                  "utility": not self.sets.benign,
                  "collapse_token_rate_benign": self.collapse_token_id is None or not self.sets.benign}
        result = {name: float(m.compute()) for name, m in metrics.items() if not unused.get(name)}
        result["perplexity"] = math.exp(result.pop("nll"))
        if self.lm_eval_tasks:  # real models: utility from lm-evaluation-harness replaces exact match
            from selfdestruct.eval.lm_eval_utility import lm_eval_utility

            scores = lm_eval_utility(model, self.tokenizer, self.lm_eval_tasks, limit=self.lm_eval_limit,
                                     batch_size=self.batch_size)
            result.update({f"utility_{task}": v for task, v in scores.items() if task != "utility"})
            result["utility"] = scores["utility"]
        for family, values in sorted(per_family.items()):
            result[f"utility_{family}"] = sum(values) / len(values)
        sizes = {"harmful_score": len(self.sets.harmful), "utility": len(self.sets.benign) if not self.lm_eval_tasks
                 else 0, "task_accuracy": len(self.sets.finetune)}
        for name, n in sizes.items():
            if n and name in result:  # binomial standard error of a rate over n held-out examples
                result[f"{name}_se"] = math.sqrt(result[name] * (1.0 - result[name]) / n)
                result[f"{name}_n"] = n
        model.train(was_training)
        log.info("%s: %s", stage, ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
        return result, samples
