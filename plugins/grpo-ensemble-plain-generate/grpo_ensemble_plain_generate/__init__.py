"""An example third-party plugin: `plain_generate`, a generator over plain `model.generate`.

No custom decoder and no KV-cache tricks: each batch is one call of Hugging Face transformers'
`generate`, which shows that any generator can sample for the policy as long as it returns
what the trainer needs (token ids in the policy's tokenizer, cut after EOS, and the behaviour
log-prob of every token). Installed with pip, it is found through the `grpo_ensemble` entry
point declared in its pyproject.toml; a recipe then uses it by name:

    policy:
      model: builtin:tiny-arith-small
      generator: plain_generate
    peers:
      - name: strong
        model: builtin:tiny-arith-base
        generator: plain_generate
        params: {batch_size: 32}

Behaviour log-probs. With `output_scores=True`, `generate` returns in `out.scores` the logits
of every step *after* its logits processors: with sampling, after the EOS mask of
`min_new_tokens`, then temperature, top-k and top-p (filtered tokens at -inf). Their
log-softmax is the distribution each token was drawn from, so a token's behaviour log-prob is
`log_softmax(logits / T)` (restricted to the top-k / top-p set when those filter) — with
top_k 0 and top_p 1 exactly what the trainer computes from a forward of prompt + completion at
the sampling temperature. Greedy decoding (temperature 0) applies no temperature, top-k or
top-p, so there the returned log-probs are those of the model's raw logits (temperature 1, the
EOS mask of `min_new_tokens` aside) at the argmax token, not the 0 of the point mass that
greedy decoding actually draws from.

Reproducibility. With `sampling.seeds` (one per prompt), each prompt's n rows are generated
as batches of their own, torch's generators seeded from the prompt's seed: a prompt's
candidates then depend only on its seed (and `batch_size` when n exceeds it), never on the
other prompts of the call. The caller's random state is restored afterwards. Without seeds,
rows of all prompts share batches and draw from torch's global generator.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

from grpo_ensemble import (
    Candidate,
    Generator,
    Prompt,
    SamplingParams,
    UserError,
    candidate_seed,
    hookimpl,
    render_prompt,
)

# Settings that a checkpoint's generation_config.json may set and that would change the
# distribution sampled from beyond temperature, top-k and top-p: set to their neutral values
# so that the checkpoint's defaults do not leak in. (Settings whose only neutral value is
# "unset", such as `min_p` or `suppress_tokens`, cannot be overridden by a keyword; the
# behaviour log-probs still follow the distribution actually sampled from.)
NEUTRAL = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


class PlainGenerate(Generator):
    """Samples with `model.generate` of a transformers causal LM.

    `model` is an `nn.Module` (the trainer passes the module being trained, with its
    `tokenizer`), or a path or hub id that `AutoModelForCausalLM` and `AutoTokenizer` load
    (frozen, in eval mode). Rows (each prompt repeated n times) are generated `batch_size` at a
    time, prompts padded on the left.
    """

    name = "plain_generate"

    def __init__(self, model, tokenizer=None, batch_size: int = 64):
        if isinstance(model, str | os.PathLike):
            model, tokenizer = _load(os.fspath(model), tokenizer)
        elif not isinstance(model, torch.nn.Module):
            kind = type(model).__name__
            raise UserError(f"plain_generate: model must be a path or a torch module, not {kind}")
        if tokenizer is None:
            raise UserError("plain_generate needs a tokenizer (tokenizer=) with a model object")
        if tokenizer.eos_token_id is None:
            raise UserError("plain_generate: the tokenizer has no eos_token")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(
                f"plain_generate: batch_size must be a positive integer: {batch_size!r}"
            )
        self._special = True  # add the tokenizer's special tokens (a string prompt)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # the module itself: nothing to copy

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams
    ) -> list[list[Candidate]]:
        prompts = list(prompts)
        if sampling.seeds is not None and len(sampling.seeds) != len(prompts):
            raise ValueError(f"{len(sampling.seeds)} seeds for {len(prompts)} prompts")
        if not prompts or n <= 0:
            return [[] for _ in prompts]
        if sampling.max_new_tokens <= 0:
            return [[Candidate("", [], "", [], finished=False) for _ in range(n)] for _ in prompts]
        bs = self.batch_size
        # a conversation through this model's chat template, which writes its special tokens
        self._special = prompts[0].messages is None

        def render(p: Prompt) -> str:
            return render_prompt(p, self.tokenizer)

        # (texts, seed or None) of each call of `generate`
        batches: list[tuple[list[str], int | None]] = []
        if sampling.seeds is not None:  # each prompt's rows alone, seeded by the prompt
            for p, seed in zip(prompts, sampling.seeds, strict=True):
                for j in range(0, n, bs):
                    rows = min(bs, n - j)
                    batches.append(([render(p)] * rows, candidate_seed(seed, j) % 2**63))
        else:
            texts = [render(p) for p in prompts for _ in range(n)]  # each prompt n times, in order
            batches = [(texts[i : i + bs], None) for i in range(0, len(texts), bs)]
        flat: list[Candidate] = []
        with self._ready():
            for texts, seed in batches:
                flat.extend(self._batch(texts, sampling, seed))
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    @contextlib.contextmanager
    def _ready(self) -> Iterator[None]:
        """The model in eval mode, the tokenizer padding on the left (with the EOS token as
        padding if it has none), all put back as they were afterwards."""
        model, tok = self.model, self.tokenizer
        was_training, side, pad = model.training, tok.padding_side, tok.pad_token
        model.eval()
        tok.padding_side = "left"  # generation appends on the right of every row
        if pad is None:
            tok.pad_token = tok.eos_token
        try:
            yield
        finally:
            model.train(was_training)
            tok.padding_side = side
            if pad is None:
                tok.pad_token = None

    def _device(self) -> torch.device:
        device = getattr(self.model, "device", None)
        if isinstance(device, torch.device):
            return device
        return next(self.model.parameters()).device

    def _batch(self, texts: list[str], sampling: SamplingParams, seed: int | None):
        tok = self.tokenizer
        device = self._device()
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=self._special)
        kwargs = {
            **NEUTRAL,
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device),
            "max_new_tokens": sampling.max_new_tokens,
            "min_new_tokens": sampling.min_new_tokens,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "output_scores": True,
            "return_dict_in_generate": True,
        }
        if sampling.temperature == 0:
            kwargs["do_sample"] = False
        else:
            # top_k is passed even when 0: left out, generate falls back on the checkpoint's
            # generation_config or its global default of 50 (0 and None both disable it)
            kwargs.update(
                do_sample=True,
                temperature=float(sampling.temperature),
                top_k=int(sampling.top_k),
                top_p=float(sampling.top_p),
            )
        with _seeded(seed, device) if seed is not None else contextlib.nullcontext():
            out = self.model.generate(**kwargs)
        new = out.sequences[:, enc["input_ids"].shape[1] :]  # (rows, T)
        # out.scores: T tensors (rows, vocab), the processed logits of each step
        logps = torch.stack(
            [
                torch.log_softmax(s.float(), dim=-1).gather(1, new[:, t : t + 1]).squeeze(1)
                for t, s in enumerate(out.scores)
            ],
            dim=1,
        )  # (rows, T)
        new, logps = new.cpu(), logps.cpu()
        return [self._candidate(new[i], logps[i]) for i in range(len(texts))]

    def _candidate(self, ids: torch.Tensor, logps: torch.Tensor) -> Candidate:
        hits = (ids == self.tokenizer.eos_token_id).nonzero()
        finished = len(hits) > 0
        length = int(hits[0]) + 1 if finished else len(ids)  # EOS kept
        token_ids = ids[:length].tolist()
        return Candidate(
            text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
            token_ids=token_ids,
            source="",
            behaviour_logprobs=logps[:length].tolist(),
            finished=finished,
        )


def _load(path: str, tokenizer):
    """A model and tokenizer from a path or hub id, the model frozen and in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"plain_generate: cannot load model {path!r}: {text[:300]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's generators for the CPU and `device` seeded with `seed`, put back afterwards."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]), torch.cuda.device(index):
            torch.default_generator.manual_seed(seed)
            torch.cuda.manual_seed(seed)  # the current device's generator only
            yield
    else:  # the CPU (and, for another accelerator, every generator torch.manual_seed sets)
        with torch.random.fork_rng(devices=[]):
            if device.type == "cpu":
                torch.default_generator.manual_seed(seed)
            else:
                torch.manual_seed(seed)
            yield


@hookimpl
def register_generators(register):
    register(PlainGenerate)
