"""`reward_model`: a sequence-classification model's score of each (prompt, completion).

The model is loaded from a path (or hub id) with its own tokenizer, frozen, and scores text as
TRL's GRPOTrainer hands it to a reward model: the prompt followed by the completion, padded on
the right, the first logit of the classification head. A conversation is rendered with the
reward model's own chat template, the completion as the assistant's reply. The run places it
as it places a frozen peer: whole on its device and in its precision, or sharded across the
ranks (`train.frozen_models: shard`), when every rank runs as many forwards as the busiest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ... import dist
from ...errors import UserError
from ...types import Sample
from ..interfaces import RewardScorer


class RunningNorm:
    """Mean and standard deviation of every score seen so far (Welford's update), to scale a
    reward model's raw logits to about unit size whatever its head learned."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: Sequence[float]) -> None:
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        """Unbiased; 1 until there are two values (nothing to scale by yet)."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def apply(self, values: Sequence[float], eps: float = 1e-6) -> list[float]:
        return [(x - self.mean) / (self.std + eps) for x in values]


class RewardModel(RewardScorer):
    """Scores with `model`, a `transformers` sequence-classification model (one label).

    `batch_size`: texts per forward. `max_length`: tokens kept of each text (its start;
    None: all). `normalize`: scale scores by the running mean and std of every score so far
    (this call's included). `chat_template`: inline Jinja or a file, for conversations when
    the model's tokenizer has none (or to replace its own).
    """

    name = "reward_model"
    # True once its weights are sharded across ranks: each forward then needs every rank
    collective = False

    def __init__(
        self,
        model: str,
        batch_size: int = 32,
        max_length: int | None = None,
        normalize: bool = False,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
    ):
        from transformers import AutoModelForSequenceClassification

        from ...models.chat import read_chat_template
        from ...models.loading import LOAD_ERRORS, load_tokenizer, resolve_model, warn_remote_code

        path = resolve_model(str(model), "model")
        if trust_remote_code:
            warn_remote_code("reward_model.model", path)
        try:
            self.tokenizer = load_tokenizer(path, trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, trust_remote_code=trust_remote_code
            )
        except LOAD_ERRORS as exc:
            text = " ".join(str(exc).split())[:300]
            raise UserError(f"cannot load reward model {model!r}: {text}") from None
        if self.model.config.num_labels != 1:
            raise UserError(
                f"reward model {model!r} has {self.model.config.num_labels} labels, not 1"
            )
        self.model.requires_grad_(False).eval()
        if self.model.config.pad_token_id is None:  # finds each row's last token by it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        template = read_chat_template(chat_template, "chat_template")
        if template:
            self.tokenizer.chat_template = template
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.norm = RunningNorm() if normalize else None

    def place_model(self, place: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        from ...models.zero import zero3_managed

        self.model = place(self.model)
        self.collective = zero3_managed(self.model) and dist.world_size() > 1

    def token_ids(self, sample: Sample) -> list[int]:
        """The candidate as the model reads it: prompt and completion, or the conversation
        with the completion as the reply in the model's chat template (which holds its
        special tokens already), cut to `max_length`."""
        from ...models.chat import render_exchange

        if sample.prompt.messages:
            if not getattr(self.tokenizer, "chat_template", None):
                raise UserError(
                    "reward_model: the prompts are conversations and the reward model's "
                    "tokenizer has no chat template: give params.chat_template"
                )
            text = render_exchange(sample.prompt, sample.completion, self.tokenizer)
            ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        else:
            text = sample.prompt.text + sample.completion
            ids = self.tokenizer(text, verbose=False)["input_ids"]
        return ids[: self.max_length] if self.max_length is not None else ids

    @torch.no_grad()
    def score(self, samples: Sequence[Sample]) -> list[float]:
        ids = [self.token_ids(s) for s in samples]
        batches = [ids[i : i + self.batch_size] for i in range(0, len(ids), self.batch_size)]
        rounds = len(batches)
        if self.collective:  # a sharded forward gathers each layer from every rank
            rounds = int(dist.all_max([float(rounds)])[0])
        filler = [[self.tokenizer.pad_token_id]]  # for a rank with fewer texts: a token
        out: list[float] = []
        for k in range(rounds):
            logits = self._first_logits(batches[k] if k < len(batches) else filler)
            if k < len(batches):
                out.extend(logits)
        if self.norm is not None:
            self.norm.update(out)
            out = self.norm.apply(out)
        return out

    def _first_logits(self, batch: list[list[int]]) -> list[float]:
        device = next(self.model.parameters()).device
        enc = self.tokenizer.pad(
            {"input_ids": batch}, padding=True, padding_side="right", return_tensors="pt"
        ).to(device)
        return self.model(**enc).logits[:, 0].float().tolist()
