"""Evaluation: GSM8K, summarization (ROUGE), perplexity, prompt files, before/after reports, training callbacks.

Submodules import torch/transformers lazily inside functions, so importing `tunelab.evaluation.extract` (the answer
extraction the rewards share) stays cheap.
"""
