"""A function of tensors replayed as a CUDA graph: one launch instead of one per kernel, for
work whose kernels are shorter than their launches (the sampling loop's decode step, see
decode.py).

A graph replays the kernels of its capture with the same shapes and the same addresses: the
function must read and write only its inputs (the graph's copies of them), tensors that live
as long as the graph and stay where they are (a preallocated cache, buffers), and what it
allocates itself (the graph's own memory pool); its state must live on the device (a position
as a tensor, advanced in place), since the Python code runs once, at the capture.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}  # one per GPU, made at first use


class GraphedCall:
    """`fn(*inputs)` → a tensor, replayed as a CUDA graph after its first call.

    The first call runs `fn` on copies of the inputs (which also warms up what a capture needs
    ready, such as the matrix-product library's workspace) and then captures it into a graph;
    each later call copies its inputs into those copies and replays the graph, whose output
    tensor is the same one each time (read it before the next call). Where the capture fails
    (an operation a graph cannot hold), every later call runs `fn` itself, with a warning.

    The capture runs on a stream of its own, as CUDA asks, and without `torch.cuda.graph`'s
    emptying of the allocator's cache (a graph captured in each sampling call would otherwise
    leave the update to allocate its memory from the driver again every step). Its mode is
    thread-local: other threads may use the GPU meanwhile."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.inputs: list[torch.Tensor] = []
        self.out: torch.Tensor | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            for mine, x in zip(self.inputs, inputs, strict=True):
                mine.copy_(x)
            self.graph.replay()
            return self.out
        if self.failed:
            return self.fn(*inputs)
        self.inputs = [x.clone() for x in inputs]
        result = self.fn(*self.inputs)
        device = self.inputs[0].device
        stream = _CAPTURE_STREAMS.get(device)
        if stream is None:
            stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self.out = self.fn(*self.inputs)
                finally:
                    graph.capture_end()
        except RuntimeError as e:  # nothing ran during the capture: the state is as it was
            warnings.warn(f"running without a CUDA graph: its capture failed ({e})", stacklevel=2)
            self.failed = True
            return result
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = graph
        return result
