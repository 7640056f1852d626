"""English stopwords, and which tokens of a vocabulary are one (The Super Weight, Figure 2 III and Figure 11).

`STOPWORDS` is mwjax's own list of common English function words: articles and determiners, pronouns,
prepositions, conjunctions, auxiliary and modal verbs and a few function adverbs, lowercase, without
punctuation (no contractions or their fragments such as "don", "t"). It follows the usual NLTK-style English
stopword list in spirit; it is written for mwjax, not copied from it.

A token is a stopword token when its decoded text, stripped of whitespace and of a leading BPE / SentencePiece
word marker ('Ġ', '▁') and lowercased, is in the list: " The", "the" and "ĠThe" all count.
No jax here: the command lines import it while parsing their flags.
"""

from __future__ import annotations

from collections.abc import Iterable

NAME = "mwjax.data.stopwords.STOPWORDS"  # how outputs name the list

STOPWORDS: tuple[str, ...] = (
    # articles and determiners
    "a", "an", "the", "this", "that", "these", "those", "each", "every", "some", "any", "all", "both", "either",
    "neither", "no", "such", "other", "another", "own", "same", "few", "more", "most", "much", "many", "several",
    # personal, possessive, reflexive, relative and interrogative pronouns
    "i", "me", "my", "mine", "myself", "we", "us", "our", "ours", "ourselves", "you", "your", "yours", "yourself",
    "yourselves", "he", "him", "his", "himself", "she", "her", "hers", "herself", "it", "its", "itself", "they",
    "them", "their", "theirs", "themselves", "who", "whom", "whose", "which", "what",
    # prepositions
    "about", "above", "across", "after", "against", "along", "among", "around", "at", "before", "behind", "below",
    "beneath", "beside", "between", "beyond", "by", "down", "during", "for", "from", "in", "inside", "into",
    "near", "of", "off", "on", "onto", "out", "over", "since", "through", "to", "toward", "towards", "under",
    "until", "up", "upon", "with", "within", "without",
    # conjunctions and subordinators
    "and", "but", "or", "nor", "so", "yet", "if", "because", "as", "although", "though", "while", "whereas",
    "unless", "whether", "than", "then", "once",
    # function adverbs
    "here", "there", "when", "where", "why", "how", "again", "further", "very", "too", "also", "just", "only",
    "not", "now",
    # auxiliary and modal verbs
    "am", "is", "are", "was", "were", "be", "been", "being", "have", "has", "had", "having", "do", "does", "did",
    "doing", "will", "would", "shall", "should", "can", "could", "may", "might", "must",
)

MARKERS = "\u0120\u2581"  # 'Ġ' (byte-level BPE's space) and '▁' (SentencePiece's)


def normalize(text: str) -> str:
    """A token's text as the list is matched against: whitespace and a leading word marker stripped, lowercased.

    Args:
      text: a decoded token, e.g. " The" or "ĠThe".

    Returns:
      The bare lowercase word ("the").
    """
    return text.strip().lstrip(MARKERS).strip().lower()


def token_ids(tokenizer, words: Iterable[str] = STOPWORDS) -> tuple[int, ...]:
    """The ids of the tokens of `tokenizer` that are stopwords (module doc): each id decoded on its own.

    Args:
      tokenizer: an HF tokenizer (`len()` gives its vocabulary, `batch_decode` its tokens' texts).
      words: the stopwords, lowercase (`STOPWORDS` by default).

    Returns:
      The token ids, ascending (several per word: "the", " the", " The", ...).
    """
    words = frozenset(words)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(i for i, text in enumerate(texts) if normalize(text) in words)
