"""The generation engine behind the `hf` generator: the sampling loop, the lean decode step,
CUDA graphs, and the recording of sampling's products that the update may replay.

The trainer never imports this package: it sees the `hf` generator through the plugin
registry, and uses what the generator offers through its documented capabilities
(`grpo_ensemble.plugins.interfaces`)."""
