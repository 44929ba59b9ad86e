"""The merge: reading checkpoints safely, validating the plan, copying rows, metrics."""
