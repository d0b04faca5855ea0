"""Built-in tiny causal LMs for the arithmetic task, built locally so nothing is downloaded.

Each model is a small Llama with a character-level tokenizer, warmed up with a few hundred
supervised steps on *noisy* labels: it learns addition but keeps part of its probability on
wrong answers, so it is partly competent and GRPO with an exact-match reward can improve it.
`ensure_builtin_model(name)` builds a model once (its supervised warm-up, on the CPU), saves it
in Hugging Face format under a cache directory and returns that directory for `from_pretrained`.

Prompts are encoded with `add_special_tokens=True` (the tokenizer prepends `<bos>`); the model
answers with the digits of the sum followed by `<eos>`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..data.tasks import arithmetic_rows
from ..errors import UserError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3, in this order
CHARACTERS = list("0123456789+-*= ")
MAX_POSITIONS = 64
_WARMUP_STEPS = 40  # linear learning-rate warm-up of the supervised warm-up
_BUILD_FORMAT = 1  # bump when the build code changes in a way the spec does not capture


@dataclass(frozen=True)
class TinySpec:
    """Architecture and warm-up recipe of one built-in model; its hash names the cache entry."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    steps: int  # supervised warm-up steps
    lr: float
    batch_size: int
    noise_p: float  # probability that a warm-up label is replaced by a wrong answer
    seed: int = 0
    chat_template: str = ""  # saved with the tokenizer; the weights do not depend on it
    tokenizer: str = "chars"  # chars: one token per character; digit-pairs: "37" is one token

    def version(self) -> str:
        """Short stable hash of the spec, so that changing the spec rebuilds the model."""
        spec = dataclasses.asdict(self)
        if spec["tokenizer"] == "chars":  # the models that predate the field keep their hash
            del spec["tokenizer"]
        blob = json.dumps({**spec, "format": _BUILD_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# The built-in models learned prompts as plain text ("<bos>37+45="), so their chat templates
# render a conversation as its user turns' text after BOS. The two are written differently,
# as two model families' templates are, and render the same text, so that a conversational
# run of the built-in task shows each member rendering with its own.
SMALL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ message['content'] }}{% endif %}{% endfor %}"
)
BASE_TEMPLATE = (
    "{{ bos_token }}{{ messages | selectattr('role', 'equalto', 'user') "
    "| map(attribute='content') | join('') }}"
)

BUILTIN_MODELS: dict[str, TinySpec] = {
    # The weaker model, stopped soon after addition starts to click: greedy decoding is right
    # on about a third of test prompts, a temperature-1 sample on about a fifth.
    "tiny-arith-small": TinySpec(
        num_layers=2, hidden_size=64, num_heads=4, intermediate_size=256,
        steps=380, lr=3e-3, batch_size=128, noise_p=0.2, chat_template=SMALL_TEMPLATE,
    ),
    # The stronger model: greedy right on about two thirds of test prompts; the noisy labels
    # keep samples right only about 40% of the time, which leaves GRPO room to improve.
    "tiny-arith-base": TinySpec(
        num_layers=2, hidden_size=128, num_heads=4, intermediate_size=512,
        steps=500, lr=3e-3, batch_size=128, noise_p=0.2, chat_template=BASE_TEMPLATE,
    ),
    # A model of another tokenizer (two digits to a token) and size, between the two: its
    # candidates reach the others as text, re-tokenized, and theirs reach it so. Its answers
    # are one or two tokens, each of a hundred: greedy right on about a fifth of test prompts.
    "tiny-arith-pairs": TinySpec(
        num_layers=2, hidden_size=96, num_heads=4, intermediate_size=384,
        steps=900, lr=3e-3, batch_size=128, noise_p=0.2, chat_template=SMALL_TEMPLATE,
        tokenizer="digit-pairs",
    ),
}  # fmt: skip


def build_tokenizer(kind: str = "chars") -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, `<bos>` prepended on encode; with
    `digit-pairs`, each run of digits is cut into pairs from its start ("123": "12", "3")."""
    pairs = [f"{i:02d}" for i in range(100)] if kind == "digit-pairs" else []
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS + pairs)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Split every character into its own word, spaces included, so "37+45=" is six tokens.
    pattern = "[0-9]{2}|." if pairs else "."
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    # Fuse concatenates tokens on decode; the default would put a space between characters.
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )


def _new_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model


def _noisy_answer(a: int, b: int, gen: torch.Generator) -> str:
    """A systematic wrong answer: the sum off by one, the kind of slip the model must unlearn."""
    offset = 1 if torch.rand((), generator=gen).item() < 0.5 else -1
    return str(abs(a + b + offset))


def _warmup_batch(
    rows: list[tuple[int, int]], spec: TinySpec, tok: PreTrainedTokenizerFast, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of `<bos> prompt answer <eos>`, right-padded; labels only on answer and eos."""
    picks = torch.randint(len(rows), (spec.batch_size,), generator=gen).tolist()
    noisy = (torch.rand(spec.batch_size, generator=gen) < spec.noise_p).tolist()
    prompts, answers = [], []
    for i, is_noisy in zip(picks, noisy, strict=True):
        a, b = rows[i]
        prompts.append(f"{a}+{b}=")
        answers.append(_noisy_answer(a, b, gen) if is_noisy else str(a + b))
    texts = [p + ans for p, ans in zip(prompts, answers, strict=True)]
    enc = tok(texts, padding=True, return_tensors="pt")  # (batch, seq), starts with <bos>
    # Append eos after the last real token: (batch, seq + 1)
    ids = torch.cat([enc.input_ids, torch.full((spec.batch_size, 1), tok.pad_token_id)], dim=1)
    mask = torch.cat([enc.attention_mask, torch.zeros(spec.batch_size, 1, dtype=torch.long)], 1)
    lengths = enc.attention_mask.sum(1)  # (batch,) bos + prompt + answer
    ids[torch.arange(spec.batch_size), lengths] = tok.eos_token_id
    mask[torch.arange(spec.batch_size), lengths] = 1
    labels = torch.full_like(ids, -100)
    for row, (p, ans) in enumerate(zip(prompts, answers, strict=True)):
        start = 1 + _tokens(tok, p)  # bos + the prompt's tokens
        end = start + _tokens(tok, ans) + 1  # the answer's tokens and eos
        labels[row, start:end] = ids[row, start:end]
    return ids, mask, labels


def _tokens(tok: PreTrainedTokenizerFast, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _warm_up(model: LlamaForCausalLM, spec: TinySpec, tok: PreTrainedTokenizerFast) -> None:
    """Supervised next-token training on noisy labels, seeded by the spec alone."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    operands = [r["prompt"].rstrip("=").split("+") for r in arithmetic_rows("train")]
    rows = [(int(a), int(b)) for a, b in operands]
    # beta2 0.98, a short linear warm-up, then a constant rate: these models learn addition
    # in a sudden jump after a plateau, and decaying the rate delays the jump.
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / _WARMUP_STEPS, 1.0))
    tok.padding_side = "right"  # positions then start at 0, as generate() does for left pads
    model.train()
    for _ in range(spec.steps):
        ids, mask, labels = _warmup_batch(rows, spec, tok, gen)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def build_model(spec: TinySpec) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build and warm up one model on the CPU in fp32; the caller's RNG state is left as it was."""
    tokenizer = build_tokenizer(spec.tokenizer)
    threads = torch.get_num_threads()
    # fork_rng restores the CPU generator afterwards; seeding only the CPU generator leaves
    # any CUDA generators of the caller alone (torch.manual_seed would reseed them too).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(spec.seed)  # weight init draws from it
        # Two threads, the setting the warm-up recipe is tuned for; more barely helps such
        # small matrices, and one more thread than cores makes every op wait on the scheduler.
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        try:
            model = _new_model(spec, tokenizer)
            _warm_up(model, spec, tokenizer)
        finally:
            torch.set_num_threads(threads)
    tokenizer.padding_side = "left"
    tokenizer.chat_template = spec.chat_template or None
    return model, tokenizer


def default_cache_dir() -> Path:
    """`$GRPO_ENSEMBLE_CACHE` if set, else `~/.cache/grpo_ensemble`."""
    env = os.environ.get("GRPO_ENSEMBLE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "grpo_ensemble"


def ensure_builtin_model(name: str, cache_dir: Path | None = None) -> Path:
    """Directory of built-in model `name` in Hugging Face format, built on first use.

    The model is built in a temporary sibling directory and renamed into place, so a reader
    never sees half a model; when two processes race, the first rename wins and the other
    build is thrown away.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "models" / f"{name}-{spec.version()}"
    if (target / "config.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:  # e.g. $GRPO_ENSEMBLE_CACHE names a file, or is read-only
        raise UserError(
            f"cannot build the built-in model {name!r} under {str(root)!r} "
            f"($GRPO_ENSEMBLE_CACHE or ~/.cache/grpo_ensemble): {exc.strerror or exc}"
        ) from None
    try:
        model, tokenizer = build_model(spec)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@torch.no_grad()
def greedy_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    rows: list[dict[str, str]],
    max_new_tokens: int = 5,
    batch_size: int = 256,
) -> float:
    """Fraction of rows whose greedy completion, stripped, equals the row's answer exactly."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on right
    correct = 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            enc = tokenizer([r["prompt"] for r in batch], padding=True, return_tensors="pt")
            enc = enc.to(next(model.parameters()).device)
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens)
            completions = out[:, enc.input_ids.shape[1] :]  # (batch, new tokens)
            texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
            correct += sum(t.strip() == r["answer"] for t, r in zip(texts, batch, strict=True))
    finally:
        tokenizer.padding_side = side
    return correct / max(len(rows), 1)
