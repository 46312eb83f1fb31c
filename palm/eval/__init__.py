"""Evaluation: perplexity and bits per byte (perplexity.py), length extrapolation
(extrapolation.py), lm-evaluation-harness tasks through a palm model (harness.py), and `palm eval`
(cli.py)."""
