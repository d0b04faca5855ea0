"""Built-in generators: `hf`, sampling from a transformers causal LM."""

from __future__ import annotations

from ...engine.hf import HFGenerator
from ..hookspecs import hookimpl


@hookimpl
def register_generators(register):
    register(HFGenerator)
