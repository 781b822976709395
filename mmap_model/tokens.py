"""Tokenizing many class texts: open_clip's tokenizer, with a faster path for plain ASCII text.

open_clip's `SimpleTokenizer` (the CLIP BPE, `clean="lower"`) cleans every text with ftfy and
`html.unescape` before it splits and encodes it; for class texts, that cleaning is most of the
tokenizer's time (about 55 us a text of which ftfy alone takes about half, measured on the 2-core dev
box), and it is the largest share of loading thousands of tasks (docs/benchmarks.md, "Many tasks").
On text made only of printable ASCII characters other than '&' both leave the text as it is (ftfy's
fixes touch HTML entities, which need '&', control and escape characters, line breaks other than
'\\n', and non-ASCII characters; `html.unescape` needs '&'), so for such text `tokenize` skips them
and runs the rest of `SimpleTokenizer.encode` as it is: whitespace collapsed, lower case, the same
split pattern, byte encoding and BPE (with the tokenizer's own cache), the same start, end, padding
and truncation. Every other text, and every other tokenizer, goes to the tokenizer itself. Equality
with the tokenizer is tested on texts made to probe each step (tests/test_encoders.py).
"""

from __future__ import annotations

import re

import torch
from open_clip.tokenizer import SimpleTokenizer, get_clean_fn
from torch import Tensor

PLAIN = re.compile(r"[ -%'-~]*")  # printable ASCII (0x20-0x7e) but '&' (0x26)


def tokenize(tokenizer, texts: list[str]) -> Tensor:
    """`tokenizer(texts)`: token ids [N, context_length]; plain ASCII texts faster with open_clip's SimpleTokenizer
    (see the module's docstring)."""
    if not _plain_path(tokenizer):
        return tokenizer(texts)
    table = {c: tokenizer.byte_encoder[c] for c in range(0x20, 0x7f)}
    words: dict[str, list[int]] = {}  # a split piece's ids, for this call
    length, sot, eot = tokenizer.context_length, tokenizer.sot_token_id, tokenizer.eot_token_id
    rows = []
    for text in texts:
        if PLAIN.fullmatch(text):
            ids = [sot]
            for token in tokenizer.pat.findall(" ".join(text.split()).lower()):
                if token not in words:
                    words[token] = [tokenizer.encoder[t] for t in tokenizer.bpe(token.translate(table)).split(" ")]
                ids += words[token]
        else:
            ids = [sot, *tokenizer.encode(text)]
        ids.append(eot)
        if len(ids) > length:
            ids = [*ids[:length - 1], eot]
        rows.append(ids + [0] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)


def _plain_path(tokenizer) -> bool:
    """The tokenizer is open_clip's BPE tokenizer with the cleaning the fast path reproduces."""
    return (type(tokenizer) is SimpleTokenizer and tokenizer.clean_fn is get_clean_fn("lower")
            and tokenizer.reduction_fn is None and bool(tokenizer.context_length))
