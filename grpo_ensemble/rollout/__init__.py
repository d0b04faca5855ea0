"""A step's rollout: the ensemble samples, scorers score, the group evaluator turns rewards
into advantages. Plain values in, plain values out; nothing here knows the trainer."""
