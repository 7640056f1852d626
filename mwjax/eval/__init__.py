"""Evaluation: perplexity (massive-activations protocol), corpora, generation.

    from mwjax.eval import perplexity, generate_text

The exported functions load their modules (and jax) on first use, so that the flag-only modules of the eval
package (the task lists, the judge's settings) import without them.
"""

from mwjax.core import lazy

__getattr__, __dir__ = lazy.exports(__name__, {
    "generate": "decoding", "generate_text": "decoding",
    "PerplexityResult": "likelihood", "chunk_tokens": "likelihood", "perplexity": "likelihood",
    "sequence_nll": "likelihood"})
__all__ = ["PerplexityResult", "chunk_tokens", "generate", "generate_text", "perplexity", "sequence_nll"]
