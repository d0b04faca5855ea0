"""Resolve and load models: local paths, hub ids, and `builtin:NAME` tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ..errors import RecipeError

BUILTIN = "builtin:"


def resolve_model(spec: str, field: str) -> str:
    """A loadable path or hub id for `spec`; builds a built-in tiny model on first use."""
    if spec.startswith(BUILTIN):
        from .tiny import BUILTIN_MODELS, ensure_builtin_model

        name = spec.removeprefix(BUILTIN)
        if name not in BUILTIN_MODELS:
            known = ", ".join(BUILTIN + n for n in sorted(BUILTIN_MODELS))
            raise RecipeError(field, f"unknown built-in model {spec!r} (known: {known})")
        return str(ensure_builtin_model(name))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise RecipeError(
                field, f"{spec!r} is not a Hugging Face model folder (no config.json)"
            )
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
    if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise RecipeError(field, f"model path {spec!r} does not exist")
    return spec  # a hub id; loading says whether it can be fetched


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends to the right of every prompt
    return tok


def load_model(
    spec: str, field: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; a missing or unloadable model is a recipe error.
    `trust_remote_code` (only where the member's recipe entry sets it) is said on stderr."""
    path = resolve_model(spec, field)
    hf_logging.disable_progress_bar()  # one bar per tiny shard is noise in a training log
    if trust_remote_code:
        warn_remote_code(field, path)
    try:
        tok = load_tokenizer(path, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except LOAD_ERRORS as exc:
        raise load_error(spec, field, exc) from None
    return model, tok


def warn_remote_code(field: str, path: str) -> None:
    """One line on stderr (rank 0, once per field): the model's own code will run."""
    from .. import dist

    member = field.rsplit(".", 1)[0]
    dist.warn_once(
        f"remote code {field}",
        f"{member}.trust_remote_code: Python code shipped with {path!r} runs in this process; "
        "only load models whose code you trust",
    )


# what loading a model folder raises for missing or damaged files, or a config transformers
# rejects (a weights file that is not safetensors: SafetensorError)
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


def load_error(spec: str, field: str, exc: BaseException) -> RecipeError:
    """The recipe error for a model that did not load: its message on one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 300:
        text = text[:300] + " …"
    return RecipeError(field, f"cannot load model {spec!r}: {text}")


def load_field_tokenizer(spec: str, field: str, trust_remote_code: bool = False):
    """The tokenizer of the model a recipe field names; one that does not load is its error."""
    path = resolve_model(spec, field)
    try:
        return load_tokenizer(path, trust_remote_code)
    except LOAD_ERRORS as exc:
        raise load_error(spec, field, exc) from None


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when both map every token to the same id (so token ids can be shared)."""
    return a is b or (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id)
