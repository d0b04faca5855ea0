"""`reward_model`: a sequence-classification model's score of each (prompt, completion).

The model is loaded from a path (or hub id) with its own tokenizer, frozen, and scores text as
TRL's GRPOTrainer hands it to a reward model: the prompt followed by the completion, padded on
the right, the first logit of the classification head. The run places it as it places a
frozen peer (its device and precision).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

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
    (this call's included).
    """

    name = "reward_model"

    def __init__(
        self,
        model: str,
        batch_size: int = 32,
        max_length: int | None = None,
        normalize: bool = False,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification

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
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.norm = RunningNorm() if normalize else None

    def place_model(self, place: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        self.model = place(self.model)

    @torch.no_grad()
    def score(self, samples: Sequence[Sample]) -> list[float]:
        texts = [s.prompt.text + s.completion for s in samples]
        out: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                truncation=self.max_length is not None,
                max_length=self.max_length,
            ).to(device)
            out.extend(self.model(**enc).logits[:, 0].float().tolist())
        if self.norm is not None:
            self.norm.update(out)
            out = self.norm.apply(out)
        return out
