"""The sampling loop's KV cache: preallocated layers written in place (`GrowingLayer`), a
group's prompt prefilled once and repeated into its rows, and the helpers that find a model's
cache in its forward's arguments and outputs."""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer with room for `room` positions allocated at its first
    update. Each update writes in place and returns views of the filled part."""

    room = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self._alloc(key_states, value_states, max(self.room, key_states.shape[-2]))
        self.filled = 0

    def _alloc(self, k: torch.Tensor, v: torch.Tensor, room: int) -> None:
        b, h = k.shape[:2]
        self.key_buf = k.new_empty((b, h, room, k.shape[-1]))
        self.value_buf = v.new_empty((b, h, room, v.shape[-1]))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.key_buf.shape[-2]:  # more than planned: grow, keeping what is there
            old_k, old_v = self.key_buf, self.value_buf
            self._alloc(old_k, old_v, 2 * end)
            self.key_buf[:, :, : self.filled] = old_k[:, :, : self.filled]
            self.value_buf[:, :, : self.filled] = old_v[:, :, : self.filled]
        self.key_buf.narrow(2, self.filled, end - self.filled).copy_(key_states)
        self.value_buf.narrow(2, self.filled, end - self.filled).copy_(value_states)
        self.filled = end
        self.keys = self.key_buf[:, :, :end]
        self.values = self.value_buf[:, :, :end]
        return self.keys, self.values


def full_attention_only(model: torch.nn.Module) -> bool:
    """True when every layer attends to the whole past (no sliding window, no linear
    attention), so that `GrowingLayer` can hold its cache."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return False
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception:  # a config this transformers cannot read that way: keep the default
        return False
    return bool(types) and all(t == "full_attention" for t in types)


def cache_name(model: torch.nn.Module) -> str | None:
    """The keyword the model's forward takes its KV cache by (`cache` from transformers 5.2x
    on, `past_key_values` before), or None."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def cache_of(out):
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def distinct_rows(*columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first (U,), inverse (B,)) for the distinct rows of the (B, ·) tensors side by side (a
    group's prompt, with its padding): row `first[u]` is one of distinct row u, and row i is
    distinct row `inverse[i]`."""
    key = torch.cat(columns, dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    b = key.shape[0]
    first = torch.full((len(distinct),), b, dtype=torch.long, device=key.device)
    rows = torch.arange(b, device=key.device)
    return first.scatter_reduce(0, inverse, rows, "amin"), inverse


def repeat_rows(cache: Cache, prefilled: Cache, inverse: torch.Tensor) -> Cache:
    """Fill `cache` with the keys and values of `prefilled` (one row per distinct prompt), row i
    taking distinct row `inverse[i]`; returns `cache`. Differentiable: a row's gradient flows
    back to its prompt's keys and values, summed over the rows that share it."""
    for i, layer in enumerate(prefilled.layers):
        cache.update(layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse), i)
    return cache


def preallocated_cache(model: torch.nn.Module, room: int) -> dict:
    """Keyword arguments that give a forward a cache of `GrowingLayer`s with `room` positions,
    or {} (the model's default cache) where such a cache does not fit the model."""
    name = cache_name(model)
    if name is None or not full_attention_only(model):
        return {}
    layer = type("GrowingLayer", (GrowingLayer,), {"room": room})
    return {name: Cache(layer_class_to_replicate=layer)}
