"""Evaluation: perplexity (massive-activations protocol), corpora, generation."""

from mwjax.eval.generate import generate, generate_text
from mwjax.eval.perplexity import PerplexityResult, chunk_tokens, perplexity, sequence_nll

__all__ = ["PerplexityResult", "chunk_tokens", "generate", "generate_text", "perplexity", "sequence_nll"]
