"""Evaluation: perplexity, lm-eval tasks, sweeps over checkpoints, published scores, bench and estimate."""
