"""Training: recipe to components (`build`), the step (`step`) and its update (`update`,
`loss`, `batching`), the DeepSpeed engine (`deepspeed`), checkpoints, metrics, evaluation, and
the loop around the steps (`loop`)."""
