"""Tokenizing many class texts: open_clip's tokenizer, with a faster path for plain ASCII text.

open_clip's `SimpleTokenizer` (the CLIP BPE, `clean="lower"`) cleans every text with ftfy and
`html.unescape` before it splits and encodes it; for class texts, that cleaning is most of the
tokenizer's time, a cost paid for every class of every task when thousands of tasks load
(docs/benchmarks.md, "Many tasks").
On text made only of printable ASCII characters other than '&' both leave the text as it is (ftfy's
fixes touch HTML entities, which need '&', control and escape characters, line breaks other than
'\\n', and non-ASCII characters; `html.unescape` needs '&'), so for such text `tokenize` skips them
and runs the rest of `SimpleTokenizer.encode` as it is: lower case, the same split pattern, byte
encoding and BPE, the same start, end, padding and truncation. No piece of the split pattern spans
whitespace, so the ids of a whitespace-separated chunk are the same wherever it occurs: each distinct
chunk ("a", "photo", a class name's words) and piece is split and encoded once a call, and the
padding is written only where ids are. Every other text, and every other tokenizer, goes to the
tokenizer itself. Equality with the tokenizer is tested on texts made to probe each step
(tests/test_encoders.py).
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
    chunks: dict[str, list[int]] = {}  # the ids of a whitespace-separated chunk, for this call
    pieces: dict[str, list[int]] = {}  # of a piece of the split pattern (BPE caches no one-character piece)

    def piece_ids(piece: str) -> list[int]:
        if piece not in pieces:
            pieces[piece] = [tokenizer.encoder[t] for t in tokenizer.bpe(piece.translate(table)).split(" ")]
        return pieces[piece]

    length, sot, eot = tokenizer.context_length, tokenizer.sot_token_id, tokenizer.eot_token_id
    rows = []
    for text in texts:
        if PLAIN.fullmatch(text):
            ids = [sot]
            for chunk in text.lower().split():
                if chunk not in chunks:
                    chunks[chunk] = [i for piece in tokenizer.pat.findall(chunk) for i in piece_ids(piece)]
                ids += chunks[chunk]
        else:
            ids = [sot, *tokenizer.encode(text)]
        ids.append(eot)
        if len(ids) > length:
            ids = [*ids[:length - 1], eot]
        rows.append(ids)
    sizes = torch.tensor([len(ids) for ids in rows], dtype=torch.long)
    out = torch.zeros(len(rows), length, dtype=torch.long)
    out[torch.arange(length) < sizes[:, None]] = torch.tensor([i for ids in rows for i in ids], dtype=torch.long)
    return out


def _plain_path(tokenizer) -> bool:
    """The tokenizer is open_clip's BPE tokenizer with the cleaning the fast path reproduces."""
    return (type(tokenizer) is SimpleTokenizer and tokenizer.clean_fn is get_clean_fn("lower")
            and tokenizer.reduction_fn is None and bool(tokenizer.context_length))
