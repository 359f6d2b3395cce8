"""What the server computes from the activations at the cut: the loss of the plan's task (`data.task`).

    task = make_task(plan.data, split)                 # LanguageModelling | Classification
    loss, n = task.loss(split, h, mask, s, labels)     # server part from block s on, then the task's loss
    logits, targets = task.scores(split, h, mask, s, labels)   # classification: per labelled sequence

The split step (runtime/train/step.py) and evaluation (runtime/outputs/evaluate.py) call only this, so a task changes
the server's loss and nothing else: the client half, the wire format and every strategy stay as they are.

- lm: blocks [s, L) + final norm + LM head, next-token cross-entropy over labelled tokens (n = tokens).
- classification: blocks [s, L) + final norm, then a sequence-classification head on the hidden state
  of the one labelled position of each sequence (its last text token, as transformers'
  `*ForSequenceClassification` pools the last non-pad token), cross-entropy over the classes (n =
  sequences). The head is the label words' output embeddings: row c is the mean of the LM head's rows
  for the tokens of " <label c>", kept frozen (the adapters learn), so the head is the LM's own
  next-token scores restricted to the label words (generative classification with label words, scored
  over the labels only). Nothing new is trained or aggregated beyond the adapters, which is why every
  strategy, checkpoint, resume and transport works unchanged; the export writes this head as the
  `score` weight of a `*ForSequenceClassification` model (runtime/outputs/export.py).
"""
from __future__ import annotations

import torch
from torch import nn

from hsplit.runtime.models.causal_lm import lm_loss


class LanguageModelling:
    name = "lm"

    def loss(self, split, h, mask, s: int, labels):
        return lm_loss(split.server_forward(h, mask, s), labels)


class Classification:
    name = "classification"

    def __init__(self, labels: list[str], tokenizer):
        self.labels = list(labels)
        self.tokens = [tokenizer(" " + lab, add_special_tokens=False)["input_ids"] or
                       tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in self.labels]
        self._weight = None

    def weight(self, split) -> torch.Tensor:
        """The head (classes x hidden): each label's word rows of the LM head, averaged (computed once)."""
        if self._weight is None:
            self._weight = label_word_head(split.lm_head.weight, self.tokens)
        return self._weight

    def scores(self, split, h, mask, s: int, labels):
        """(logits (n, classes), targets (n,)) of the labelled position of every sequence."""
        hidden = split.server_hidden(h, mask, s)
        at = labels != -100
        w = self.weight(split).to(hidden.device)
        return nn.functional.linear(hidden[at], w.to(hidden.dtype)).float(), labels[at]

    def loss(self, split, h, mask, s: int, labels):
        logits, targets = self.scores(split, h, mask, s, labels)
        n = int(targets.numel())
        if n == 0:
            return logits.sum() * 0.0, 0
        return nn.functional.cross_entropy(logits, targets), n


def label_word_head(lm_head_weight: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
    """(classes x hidden), fp32: row c is the mean of the LM head's rows of class c's label-word tokens."""
    w = lm_head_weight.detach()
    return torch.stack([w[torch.tensor(t, device=w.device)].float().mean(0) for t in tokens])


def make_task(spec, tokenizer):
    """The task of a plan's data section (labels: the plan's label set, data.labels)."""
    if spec.task == "classification":
        return Classification(spec.labels, tokenizer)
    return LanguageModelling()
