"""Plain-text corpora: Project Gutenberg cleanup, loading works, calibration / held-out split.

A corpus on disk is a folder of ``<work>.txt`` files (utf-8), one per work, as written by
:func:`fedprune.data.assets.ensure_corpus`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

#: Works never used for calibration: perplexity is measured on them only.
HELDOUT_WORKS: tuple[str, ...] = ("hamlet", "macbeth", "tempest", "twelfth_night")

# A line that opens the real text: everything up to and including it is header.
_START_LINE = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG[^\n]*"
    r"|\*END\*[ \t]*THE SMALL PRINT[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)
# A line that closes the real text: it and everything after it is footer / licence.
_END_LINE = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG[^\n]*"
    r"|\**[ \t]*End of (?:the |this )?Project Gutenberg[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)
# Licence notices interleaved in the text, e.g. ``<<THIS ELECTRONIC VERSION ... COPYRIGHT ...>>``.
_LICENCE_BLOCK = re.compile(
    r"[ \t]*<<(?:(?!>>).)*?(?:PROJECT GUTENBERG|ELECTRONIC VERSION|COPYRIGHT)"
    r"(?:(?!>>).)*>>[ \t]*\n?",
    re.IGNORECASE | re.DOTALL,
)
# Leading paragraphs that describe the etext rather than belong to the work.
_PREAMBLE_PARAGRAPH = re.compile(
    r"^(?:Produced by|This (?:e-?text|e-?book) (?:was|is)|E-?text prepared by|Transcribed from"
    r"|The Project Gutenberg E-?(?:text|book) of|Project Gutenberg'?s)",
    re.IGNORECASE,
)


def _after_last_start(text: str) -> str:
    """Text after the last Gutenberg start marker line (``text`` itself when there is none)."""
    starts = list(_START_LINE.finditer(text))
    return text[starts[-1].end() :] if starts else text


def _before_first_end(text: str) -> str:
    """Text before the first Gutenberg end marker line (``text`` itself when there is none)."""
    end = _END_LINE.search(text)
    return text[: end.start()] if end else text


def _without_licence_blocks(text: str) -> str:
    """Remove ``<<...>>`` licence notices that mention Project Gutenberg or copyright."""
    return _LICENCE_BLOCK.sub("", text)


def _without_preamble(text: str) -> str:
    """Drop leading paragraphs such as ``Produced by ...`` or ``This etext was prepared by ...``."""
    paragraphs = re.split(r"\n[ \t]*\n", text.lstrip("\n"))
    first_kept = 0
    while first_kept < len(paragraphs) and _PREAMBLE_PARAGRAPH.match(
        paragraphs[first_kept].strip()
    ):
        first_kept += 1
    if first_kept == 0:
        return text
    return "\n\n".join(paragraphs[first_kept:])


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, footers, licence blocks and etext preambles.

    Parameters
    ----------
    text
        A work as distributed, possibly wrapped in Gutenberg boilerplate.

    Returns
    -------
    str
        The work itself. A text without any boilerplate is returned unchanged; when something was
        removed, the surrounding whitespace of the remainder is stripped too.
    """
    cleaned = _after_last_start(text)
    cleaned = _before_first_end(cleaned)
    cleaned = _without_licence_blocks(cleaned)
    cleaned = _without_preamble(cleaned)
    if cleaned == text:
        return text
    return cleaned.strip()


def load_works(corpus_dir: Path) -> dict[str, str]:
    """Read every ``<work>.txt`` (utf-8) of ``corpus_dir`` into ``{work: text}``, sorted by name."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise FileNotFoundError(f"corpus folder {corpus_dir} does not exist")
    paths = sorted(corpus_dir.glob("*.txt"))
    if not paths:
        raise ValueError(f"corpus folder {corpus_dir} holds no .txt works")
    works = {path.stem: path.read_text(encoding="utf-8") for path in paths}
    logger.debug("loaded %d works from %s", len(works), corpus_dir)
    return works


def split_works(
    works: Mapping[str, str], heldout: Iterable[str] = HELDOUT_WORKS
) -> tuple[dict[str, str], dict[str, str]]:
    """Split works into ``(calibration works, held-out evaluation works)``, each sorted by name.

    Raises
    ------
    ValueError
        If a held-out name is not among ``works``.
    """
    heldout_set = set(heldout)
    missing = sorted(heldout_set - set(works))
    if missing:
        raise ValueError(
            f"held-out works {missing} are not in the corpus (it has {len(works)} works: "
            f"{sorted(works)[:8]}...)"
        )
    calibration = {name: works[name] for name in sorted(works) if name not in heldout_set}
    evaluation = {name: works[name] for name in sorted(works) if name in heldout_set}
    return calibration, evaluation
