"""Models: loading (local paths, hub ids, built-in tiny models), the KV cache's layout, the
log-probs of completions under a model, and ZeRO-3 partitioned weights. Shared by the
generation engine and the trainer, and depending on neither."""
