"""Cutting text that streams out of an LLM into sentences to speak, one at a time.

Pure Python, no Triton and no torch: the text_stream_tts model (text_stream_tts.py) imports it and
the unit tests import it directly. A sentence goes out as soon as it is known to be complete, so that speech can start
while the LLM is still writing; a long clause without a full stop goes out at `max_chars` so that
neither the wait for it nor its audio grows without bound.
"""

from __future__ import annotations

import re

# A run of ., ! or ? (closing quotes or brackets may follow) and then whitespace. The whitespace
# matters while text streams in: "3." may be followed by "14", and "Hello." by "..". At the end of
# the text, what is left is a sentence anyway. Abbreviations ("Dr. Smith") are cut too: harmless
# for speech, and guessing them is not worth the rules.
SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s)")
# Where an over-long sentence is cut: after a clause mark, else at a space.
CLAUSE_BREAK = re.compile(r"[,;:](?=\s)")
SPACE = re.compile(r"\s")


def split_sentences(text: str, max_chars: int, final: bool = False) -> tuple[list[str], str]:
    """The sentences at the start of `text` known to be complete, and the unfinished rest.

    A sentence longer than `max_chars` goes out in pieces of at most `max_chars` (see `_cut`).
    With `final` (the text is all there is) the rest is the last sentence. Sentences are stripped
    of surrounding whitespace; the rest keeps what the next piece of text continues.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars: must be >= 1, got {max_chars}")
    sentences = []
    while True:
        text = text.lstrip()
        end = SENTENCE_END.search(text)
        if end is not None and end.end() <= max_chars:
            sentences.append(text[: end.end()])
            text = text[end.end() :]
        elif len(text) > max_chars:
            cut = _cut(text, max_chars)
            sentences.append(text[:cut].rstrip())
            text = text[cut:]
        else:
            break
    if final and text:
        sentences.append(text.rstrip())
        text = ""
    return sentences, text


def _cut(text: str, max_chars: int) -> int:
    """Where to cut `text` (longer than `max_chars`, no leading space) so that the piece before is
    at most `max_chars` long: after the last clause mark in the second half of the window (a comma
    near the start would leave a tiny piece), else at the last space, else inside a word longer
    than the window. The window includes one character more, since a space there ends the piece's
    last word."""
    window = text[: max_chars + 1]
    clauses = [match.end() for match in CLAUSE_BREAK.finditer(window) if match.end() > max_chars // 2]
    if clauses:
        return clauses[-1]
    spaces = [match.start() for match in SPACE.finditer(window)]
    return spaces[-1] if spaces else max_chars


class SentenceSplitter:
    """`split_sentences` over text that arrives in pieces: `feed` each piece as it comes and
    `finish` at the end. The sentences are those of the whole text split at once."""

    def __init__(self, max_chars: int) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars: must be >= 1, got {max_chars}")
        self.max_chars = max_chars
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        """The sentences completed by `text`."""
        sentences, self._pending = split_sentences(self._pending + text, self.max_chars)
        return sentences

    def finish(self) -> list[str]:
        """The last sentence, unfinished or not (none if only whitespace was left)."""
        sentences, self._pending = split_sentences(self._pending, self.max_chars, final=True)
        return sentences
