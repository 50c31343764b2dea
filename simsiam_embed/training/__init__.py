"""Training: the one step loop, and the tasks it runs (SimSiam pretraining)."""
