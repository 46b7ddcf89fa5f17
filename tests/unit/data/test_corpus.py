"""Gutenberg stripping, loading and the calibration / held-out split, on hand-made strings."""

from __future__ import annotations

import pytest

from fedprune.data.corpus import HELDOUT_WORKS, load_works, split_works, strip_gutenberg

PLAY = "HAMLET\n\nACT I.\n\nBer.\nWho's there?\n"

MODERN = (
    "The Project Gutenberg EBook of Hamlet, by William Shakespeare\n\n"
    "This eBook is for the use of anyone anywhere at no cost.\n\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n\n"
    "Produced by Dianne Bean\n\n"
    f"{PLAY}\n\n"
    "End of the Project Gutenberg EBook of Hamlet\n\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n"
    "Updated editions will replace the previous one.\n"
)

OLD_STYLE = (
    "**The Project Gutenberg Etext of Macbeth**\n"
    "Copyright laws are changing all over the world.\n\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
    "This etext was prepared by a volunteer.\n\n"
    "MACBETH\n\n"
    "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\n"
    "SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>\n\n"
    "First Witch.\nWhen shall we three meet again?\n"
)


def test_clean_text_is_returned_unchanged():
    assert strip_gutenberg(PLAY) is PLAY


def test_word_containing_etext_is_not_boilerplate():
    text = "And my pretext to strike at him admits\nA good construction.\n"
    assert strip_gutenberg(text) == text


def test_modern_header_footer_and_producer_line_are_removed():
    assert strip_gutenberg(MODERN) == PLAY.strip()


def test_old_small_print_preamble_and_licence_block_are_removed():
    expected = "MACBETH\n\n\nFirst Witch.\nWhen shall we three meet again?"
    assert strip_gutenberg(OLD_STYLE) == expected


def test_footer_alone_is_cut():
    text = "Line one.\nLine two.\n\nEnd of Project Gutenberg's Sonnets\nlicence text\n"
    assert strip_gutenberg(text) == "Line one.\nLine two."


def test_load_works_reads_txt_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("caf\u00e9", encoding="utf-8")
    (tmp_path / ".fedprune-complete.json").write_text("{}", encoding="utf-8")
    works = load_works(tmp_path)
    assert list(works) == ["a", "b"]
    assert works["a"] == "caf\u00e9"


def test_load_works_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_works(tmp_path / "missing")
    with pytest.raises(ValueError, match="no .txt"):
        load_works(tmp_path)


def test_split_works_separates_heldout_without_mutating():
    works = {"tempest": "t", "alpha": "a", "hamlet": "h", "zeta": "z"}
    before = dict(works)
    calibration, evaluation = split_works(works, heldout=("hamlet", "tempest"))
    assert list(calibration) == ["alpha", "zeta"]
    assert list(evaluation) == ["hamlet", "tempest"]
    assert evaluation["hamlet"] == "h"
    assert works == before


def test_split_works_missing_heldout_names_it():
    with pytest.raises(ValueError, match="macbeth"):
        split_works({"hamlet": "h", "lear": "l"}, heldout=("hamlet", "macbeth"))


def test_default_heldout_works():
    assert HELDOUT_WORKS == ("hamlet", "macbeth", "tempest", "twelfth_night")
    works = {name: name for name in (*HELDOUT_WORKS, "lear")}
    calibration, evaluation = split_works(works)
    assert list(calibration) == ["lear"]
    assert sorted(evaluation) == sorted(HELDOUT_WORKS)
