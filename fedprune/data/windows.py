"""Token windows: tokenizing works, random calibration windows, fixed evaluation windows.

Documents are always visited in sorted name order, so results never depend on dict insertion order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)


def tokenize_works(tokenizer, works: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Tokenize each work without special tokens.

    Parameters
    ----------
    tokenizer
        A Hugging Face tokenizer (anything callable as ``tokenizer(text, add_special_tokens=False)``
        returning ``{"input_ids": list[int]}``).
    works
        ``{work: text}``.

    Returns
    -------
    dict[str, torch.Tensor]
        ``{work: ids}`` sorted by name, each ids a 1-D int64 tensor ``(tokens,)``.
    """
    docs: dict[str, torch.Tensor] = {}
    for name in sorted(works):
        encoded = tokenizer(works[name], add_special_tokens=False, return_attention_mask=False)
        docs[name] = torch.tensor(encoded["input_ids"], dtype=torch.int64)  # (tokens,)
    return docs


def _window_counts(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Number of valid window start offsets per document (0 when shorter than ``seq_len``)."""
    return (lengths - seq_len + 1).clamp(min=0)


def sample_windows(
    docs: Mapping[str, torch.Tensor], num_windows: int, seq_len: int, seed: int
) -> torch.Tensor:
    """Random calibration windows, as in SparseGPT / Wanda.

    Every possible window (document, start offset) is equally likely, i.e. a document is chosen with
    probability proportional to its number of valid offsets ``len - seq_len + 1`` (documents shorter
    than ``seq_len`` are never chosen) and the offset is then uniform. Windows are drawn
    independently (with replacement) from a local ``torch.Generator`` seeded with ``seed``.

    Returns
    -------
    torch.Tensor
        ``(num_windows, seq_len)`` int64 ids.

    Raises
    ------
    ValueError
        If no document has at least ``seq_len`` tokens, or on non-positive sizes.
    """
    if num_windows < 1 or seq_len < 1:
        raise ValueError(f"need num_windows >= 1 and seq_len >= 1, got {num_windows}, {seq_len}")
    names = sorted(docs)
    lengths = torch.tensor([docs[name].numel() for name in names], dtype=torch.int64)
    counts = _window_counts(lengths, seq_len)  # (docs,)
    total = int(counts.sum())
    if total == 0:
        longest = int(lengths.max()) if len(names) else 0
        raise ValueError(
            f"no document has {seq_len} tokens (longest of {len(names)} has {longest}); "
            "lower seq_len or add longer documents"
        )
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randint(total, (num_windows,), generator=generator)  # (num_windows,)
    ends = counts.cumsum(0)  # (docs,)
    doc_index = torch.searchsorted(ends, flat, right=True)  # (num_windows,)
    offsets = flat - (ends[doc_index] - counts[doc_index])  # (num_windows,)
    pairs = zip(doc_index.tolist(), offsets.tolist(), strict=True)
    rows = [docs[names[d]][o : o + seq_len] for d, o in pairs]
    return torch.stack(rows).to(torch.int64)  # (num_windows, seq_len)


def eval_windows(
    docs: Mapping[str, torch.Tensor], seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Fixed, non-overlapping evaluation windows.

    Each document (sorted by name) is cut into consecutive windows ``[0, seq_len)``,
    ``[seq_len, 2 seq_len)``, ...; the tail shorter than ``seq_len`` is dropped. Windows are ordered
    round-robin across documents (first window of each document, then the second of each, ...), so
    ``max_windows`` keeps the first windows of every document rather than exhausting the first one.

    Returns
    -------
    torch.Tensor
        ``(windows, seq_len)`` int64 ids, ``windows <= max_windows`` when given.

    Raises
    ------
    ValueError
        If no document has at least ``seq_len`` tokens, or on non-positive sizes.
    """
    if seq_len < 1:
        raise ValueError(f"need seq_len >= 1, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"need max_windows >= 1 or None, got {max_windows}")
    per_doc = [
        docs[name][: (docs[name].numel() // seq_len) * seq_len].reshape(-1, seq_len)
        for name in sorted(docs)
    ]  # each (windows_in_doc, seq_len)
    rounds = max((chunk.shape[0] for chunk in per_doc), default=0)
    ordered = [chunk[r] for r in range(rounds) for chunk in per_doc if r < chunk.shape[0]]
    if not ordered:
        raise ValueError(f"no document of {len(per_doc)} has {seq_len} tokens; lower seq_len")
    if max_windows is not None:
        ordered = ordered[:max_windows]
    return torch.stack(ordered).to(torch.int64)  # (windows, seq_len)
