"""LoRA adapters through PEFT: new adapters on the policy, an adapter folder continued, the
base model with the adapters switched off (the reference model and a peer that is the
policy's base, without a second copy of the weights), and the adapters merged for saving.

The trainer works on the transformers model itself, with PEFT's LoRA layers inside it (what
`PeftModel.get_base_model()` returns): its forward applies the adapters, every other part of
the trainer sees the causal LM it knows, and `adapters_off` gives the base model's forward
from the same weights. The `PeftModel` around it is kept for saving the adapter folder.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import RecipeError


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """PEFT's adapter layers inside `model` (none for a model without adapters)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft no model has adapters
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block `model` computes as its base model: every adapter layer passes its
    input through the base layer alone. Nothing for a model without adapters."""
    layers = [m for m in lora_layers(model) if not m.disable_adapters]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:  # back on, trainable as before (PEFT sets requires_grad)
            m.enable_adapters(True)


def is_peft_model(module) -> bool:
    """Whether `module` is a PEFT model (adapters around a base model)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


def _need_peft(field: str):
    try:
        import peft
    except ImportError:
        raise RecipeError(
            field, "adapters need PEFT: pip install 'grpo-ensemble[lora]' (or peft)"
        ) from None
    return peft


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PEFT asks transformers for a deprecated attribute name while it wraps a model: its
    FutureWarning is about PEFT's code, not the user's, so it stays out of the run's log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def linear_names(model: torch.nn.Module) -> list[str]:
    """The short names of the layers LoRA can adapt (Linear, GPT-2's Conv1D), in order."""
    kinds = ("Linear", "Conv1D")
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ in kinds]
    return list(dict.fromkeys(names))


def check_targets(model: torch.nn.Module, targets: list[str], field: str) -> None:
    """Each entry of `targets` names at least one module (PEFT's rule: the dotted path is the
    entry or ends with "." + entry); one that names none is the recipe's error."""
    paths = [n for n, _ in model.named_modules() if n]
    for i, key in enumerate(targets):
        if not any(p == key or p.endswith("." + key) for p in paths):
            known = ", ".join(linear_names(model))
            raise RecipeError(
                f"{field}.{i}", f"{key!r} matches no module of the model (its layers: {known})"
            )


def add_lora(model: torch.nn.Module, lora, field: str = "policy.lora"):
    """New LoRA adapters on `model` (in place); returns the `PeftModel` around it. Only the
    adapters' weights require gradients."""
    peft = _need_peft(field)
    targets = lora.target_modules
    if isinstance(targets, list):
        check_targets(model, targets, f"{field}.target_modules")
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        with _quiet():
            return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. no default target modules for this architecture
        text = " ".join(str(exc).split())[:300]
        raise RecipeError(
            f"{field}.target_modules", f"PEFT cannot adapt this model: {text}"
        ) from None


def check_adapter_settings(policy, path: str) -> None:
    """What `validate` can check of the policy's adapters without loading weights: LoRA's
    target modules against the model built on the meta device from its config, an adapter
    folder and its base model. `path`: the resolved policy.model."""
    if policy.adapter is not None:
        adapter_base(policy.adapter, path)
    targets = policy.lora.target_modules if policy.lora is not None else None
    if isinstance(targets, list):
        from transformers import AutoConfig, AutoModelForCausalLM

        remote = policy.trust_remote_code
        config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
        check_targets(model, targets, "policy.lora.target_modules")


def adapter_base(path: str, base: str, field: str = "policy.adapter") -> Path:
    """The adapter folder `path`, checked: it holds an adapter, trained on `base`."""
    folder = Path(path).expanduser()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        why = "does not exist" if not folder.exists() else "has no adapter_config.json"
        raise RecipeError(field, f"{path!r} {why}: give a PEFT adapter folder")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise RecipeError(field, f"cannot read {config_file}: {exc}") from None
    problem = not_plain_lora(config)
    if problem:
        raise RecipeError(field, f"{path!r}: {problem}")
    trained_on = config.get("base_model_name_or_path")
    if trained_on and not same_model(trained_on, base):
        raise RecipeError(
            field,
            f"the adapter was trained on {trained_on!r}, but policy.model is {base!r}; "
            "give the adapter's base model as policy.model",
        )
    return folder


def not_plain_lora(config) -> str | None:
    """Why an adapter configuration (a PEFT config or its adapter_config.json as a dict) is
    not one this project trains, or None. Plain LoRA only: its layers switch off for the
    base's roles and merge exactly; a module trained whole beside the adapters
    (`modules_to_save`, `trainable_token_indices`) would stay on in the reference, and DoRA's
    magnitudes or other adapter types do not merge as LoRA does."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    kind = get("peft_type")
    kind = getattr(kind, "value", kind)
    if kind != "LORA":
        return f"a {kind} adapter: only LoRA adapters are supported"
    if get("use_dora"):
        return "a DoRA adapter (use_dora): only plain LoRA is supported"
    for key in ("modules_to_save", "trainable_token_indices"):
        if get(key):
            return f"{key} is set: modules trained whole beside LoRA are not supported"
    return None


def load_adapter(model: torch.nn.Module, path: str, base: str, field: str = "policy.adapter"):
    """The adapter folder `path` on `model` (loaded from `base`, the resolved policy.model),
    trainable; returns the `PeftModel`. A folder that is no adapter, or whose base model is
    another, is the recipe's error."""
    peft = _need_peft(field)
    folder = adapter_base(path, base, field)
    try:
        with _quiet():
            return peft.PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        text = " ".join(str(exc).split())[:300]
        raise RecipeError(field, f"cannot load the adapter {path!r}: {text}") from None


def same_model(a: str, b: str) -> bool:
    """Whether two model references name the same model: the same folder, or the same id."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def quantized(model: torch.nn.Module) -> bool:
    """Whether the model's weights are quantized (merging adapters into them is lossy)."""
    config = getattr(model, "config", None)
    return getattr(config, "quantization_config", None) is not None


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights with each adapter's update added into its base layer, under the
    base model's own names (no adapter weights): a plain model's state dict. The model is
    left as it is; only the adapted weights are new tensors."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    merged: dict[str, torch.Tensor] = {}
    by_storage: dict[int, torch.Tensor] = {}
    for name, m in model.named_modules():
        if not hasattr(m, "get_delta_weight") or m.disable_adapters:
            continue
        weight = m.get_base_layer().weight
        # a linear layer keeps its adapters in lora_A, an embedding in lora_embedding_A
        held = {*m.lora_A, *getattr(m, "lora_embedding_A", {})}
        deltas = [m.get_delta_weight(a) for a in m.active_adapters if a in held]
        if deltas:
            merged[f"{name}.weight"] = weight + sum(deltas).to(weight.dtype)
            by_storage[weight.data_ptr()] = merged[f"{name}.weight"]
    for key, value in state.items():
        if ".lora_" in key or "lora_magnitude" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        # a weight tied to an adapted one (an output head tied to adapted embeddings) is the
        # very tensor: it takes the same update
        out[plain] = merged.get(plain, by_storage.get(value.data_ptr(), value))
    return out
