"""Benchmarks on spacejax models: the lm-eval backend (harness.py) and answers for judge-based benchmarks (answers.py)."""
