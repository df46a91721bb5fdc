"""The sentence splitter of text_stream_tts: where streamed LLM text is cut into sentences to speak."""

from __future__ import annotations

import re

import pytest

from csm_triton.triton.sentences import SentenceSplitter, split_sentences

pytestmark = pytest.mark.unit

STORY = (
    "Hello there! How are you today? I'm fine. "
    'She said "stop." Then, she left... Pi is 3.14 or so. '
    "This clause runs on and on without any full stop at all, so it has to be cut somewhere sensible "
    "before it grows too long to speak in one go; the end"
)


@pytest.mark.parametrize(
    ("text", "sentences", "rest"),
    [
        ("Hello there. How are", ["Hello there."], "How are"),
        ("Really?! Yes. ", ["Really?!", "Yes."], ""),
        ("Wait... what", ["Wait..."], "what"),
        ('He said "no." Then', ['He said "no."'], "Then"),
        ("(It works.) Fine", ["(It works.)"], "Fine"),
        ("Pi is 3.14 today", [], "Pi is 3.14 today"),
        # A full stop with nothing after it yet may be the start of "3.14" or "...".
        ("It costs 3.", [], "It costs 3."),
        ("Line one.\nLine two.\n", ["Line one.", "Line two."], ""),
        ("   ", [], ""),
    ],
)
def test_sentences_end_at_punctuation_followed_by_space(text: str, sentences: list[str], rest: str) -> None:
    assert split_sentences(text, max_chars=100) == (sentences, rest)


def test_at_the_end_the_rest_is_the_last_sentence() -> None:
    assert split_sentences("First one. And the last", 100, final=True) == (["First one.", "And the last"], "")
    assert split_sentences("Done.", 100, final=True) == (["Done."], "")
    assert split_sentences("Done.  \n", 100, final=True) == (["Done."], "")
    assert split_sentences(" \n ", 100, final=True) == ([], "")


def test_a_long_clause_is_cut_at_a_space_within_the_limit() -> None:
    sentences, rest = split_sentences("one two three four five six seven", max_chars=10)
    assert sentences == ["one two", "three four", "five six"]
    assert rest == "seven"
    # Exactly at the limit, followed by a space: the word is whole, the piece is full.
    assert split_sentences("abcd efghi jk", max_chars=10) == (["abcd efghi"], "jk")


def test_a_long_sentence_is_cut_after_a_clause_mark_in_the_second_half() -> None:
    assert split_sentences("Well, this goes on, and on and on.", max_chars=24) == (["Well, this goes on,"], "and on and on.")
    # A comma in the first half would leave a tiny piece: cut at the last space instead.
    assert split_sentences("Well, this goes on and on and on.", max_chars=24) == (["Well, this goes on and"], "on and on.")


def test_a_word_longer_than_the_limit_is_cut_inside() -> None:
    assert split_sentences("abcdefghijkl mn", max_chars=5) == (["abcde", "fghij"], "kl mn")


def test_no_piece_is_longer_than_the_limit() -> None:
    for max_chars in (8, 20, 40, 200):
        sentences, _ = split_sentences(STORY, max_chars, final=True)
        assert all(0 < len(sentence) <= max_chars for sentence in sentences)
        # Nothing is lost or reordered: only whitespace between pieces goes.
        assert re.sub(r"\s", "", "".join(sentences)) == re.sub(r"\s", "", STORY)


@pytest.mark.parametrize("max_chars", [8, 20, 40, 200])
def test_fed_in_pieces_gives_the_sentences_of_the_whole_text(max_chars: int) -> None:
    whole, _ = split_sentences(STORY, max_chars, final=True)
    for piece_chars in (1, 3, 7):
        splitter = SentenceSplitter(max_chars)
        streamed = []
        for start in range(0, len(STORY), piece_chars):
            streamed += splitter.feed(STORY[start : start + piece_chars])
        assert streamed + splitter.finish() == whole


def test_a_sentence_goes_out_when_the_next_word_starts() -> None:
    splitter = SentenceSplitter(100)
    assert splitter.feed("Hello there!") == []
    assert splitter.feed(" How") == ["Hello there!"]
    assert splitter.finish() == ["How"]


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_chars: must be >= 1, got 0"):
        SentenceSplitter(0)
    with pytest.raises(ValueError, match="max_chars"):
        split_sentences("text", 0)
