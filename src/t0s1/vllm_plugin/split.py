"""How a reply splits into reasoning and content at its profile's delimiters (no vLLM here)."""

from __future__ import annotations

import re

from t0s1.profiles import ModelProfile

_VISIBLE = re.compile(r"\S")
"""A non-whitespace character (``str.strip``'s whitespace)."""


def split_reply(text: str, profile: ModelProfile, *, thinking_open: bool) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole reply; None for a part that is absent or empty.
    ``thinking_open``: the prompt ended inside the thinking (its start is not in the reply)."""
    body = thinking_body(text, profile, thinking_open)
    if body is None:
        return None, text.strip() or None
    reasoning, found, content = body.partition(profile.thinking_end)
    return reasoning.strip() or None, (content.strip() or None) if found else None


def thinking_body(text: str, profile: ModelProfile, thinking_open: bool) -> str | None:
    """The reply from the start of its thinking, or None when it has no thinking."""
    stripped = text.lstrip()
    if stripped.startswith(profile.thinking_start):
        return stripped[len(profile.thinking_start) :]
    return stripped if thinking_open else None


class StreamSplit:
    """``split_reply`` on a growing reply, one delta at a time, in time proportional to the delta.

    ``feed(text)`` takes the whole reply so far (each call's text extends the last one's) and gives
    what is new of the reasoning and of the content: the reasoning is held back while its end could
    be the start of the end delimiter or is whitespace, the content until the reply cannot be the
    start of the thinking delimiter. Concatenated, the pieces are the split of the whole reply
    (``split_reply``, stripped). Each call looks at the delta and a delimiter's length around it:
    the positions of the reply's start, the thinking's first character and the end delimiter are
    found once and kept, so a long reply costs no more per token than a short one.
    """

    def __init__(self, profile: ModelProfile, *, thinking_open: bool):
        self.start, self.end, self.thinking_open = profile.thinking_start, profile.thinking_end, thinking_open
        self.ended = False  # the end delimiter and the first content are in
        self._lead: int | None = None  # the reply's first non-whitespace character
        self._body: int | None = None  # where the thinking's text starts (after the start delimiter)
        self._no_thinking = False  # the reply does not start with the thinking: all content
        self._first: int | None = None  # the thinking's first non-whitespace character
        self._end_at: int | None = None  # the end delimiter's position
        self._searched = 0  # the end delimiter is not in text[:_searched]
        self._content: int | None = None  # the content's first non-whitespace character
        self._blank_to: dict[int, int] = {}  # search start -> where its whitespace ends so far
        self._seen = 0  # characters of the reply looked at
        self._visible_to = 0  # just after the reply's last non-whitespace character
        self._reasoning_to: int | None = None  # the reasoning's end, once the end delimiter is in
        self._sent_reasoning = self._sent_content = 0  # characters sent of each

    def feed(self, text: str) -> tuple[str, str]:
        """(new reasoning, new content) of ``text``, the reply so far."""
        visible = len(text[self._seen :].rstrip())
        if visible:
            self._visible_to = self._seen + visible
        self._seen = len(text)
        if self._lead is None:
            self._lead = self._next_visible(text, 0)
            if self._lead is None:
                return "", ""
        if self._body is None and not self._no_thinking:
            reply = text[self._lead : self._lead + len(self.start)]
            if reply == self.start:
                self._body = self._lead + len(self.start)
            elif self.start.startswith(reply):
                return "", ""  # maybe the start of the thinking (written even where the prompt opened it): wait
            elif self.thinking_open:
                self._body = self._lead
            else:
                self._no_thinking = True
        if self._no_thinking:
            return "", self._take_content(text, self._lead, self._visible_end(text, self._lead, len(text)))
        return self._reasoning(text)

    def _reasoning(self, text: str) -> tuple[str, str]:
        if self._end_at is None:
            found = text.find(self.end, max(self._body, self._searched - len(self.end) + 1))
            if found < 0:
                self._searched = len(text)
            else:
                self._end_at = found
        if self._first is None:
            self._first = self._next_visible(text, self._body, self._end_at)
        if self._end_at is None:  # still thinking: hold back what may be the start of the end
            if self._first is None:
                return "", ""
            cut = len(text)
            for size in range(min(len(self.end), cut - self._first), 0, -1):
                if text.endswith(self.end[:size]):
                    cut -= size
                    break
            return self._take_reasoning(text, self._visible_end(text, self._first, cut)), ""
        if self._first is None:
            reasoning = ""
        else:
            if self._reasoning_to is None:
                self._reasoning_to = self._visible_end(text, self._first, self._end_at)
            reasoning = self._take_reasoning(text, self._reasoning_to)
        if self._content is None:
            self._content = self._next_visible(text, self._end_at + len(self.end))
            if self._content is None:
                return reasoning, ""
            self.ended = True
        return reasoning, self._take_content(text, self._content, len(text))

    def _next_visible(self, text: str, start: int, stop: int | None = None) -> int | None:
        """The first non-whitespace character of ``text[start:stop]`` (None: none yet); the
        whitespace looked at is not looked at again for the same ``start``."""
        stop = len(text) if stop is None else stop
        found = _VISIBLE.search(text, max(self._blank_to.get(start, start), start), stop)
        if found is None:
            self._blank_to[start] = stop
            return None
        return found.start()

    def _visible_end(self, text: str, first: int, stop: int) -> int:
        """``stop`` moved back over whitespace, not before ``first``: the reply's last visible
        character when that is before ``stop``, else a walk back from ``stop`` (only a held
        delimiter's length or the end delimiter lies between them)."""
        if self._visible_to <= stop:
            return max(first, self._visible_to)
        while stop > first and text[stop - 1].isspace():
            stop -= 1
        return stop

    def _take_reasoning(self, text: str, stop: int) -> str:
        start = self._first + self._sent_reasoning
        if stop <= start:
            return ""
        self._sent_reasoning += stop - start
        return text[start:stop]

    def _take_content(self, text: str, first: int, stop: int) -> str:
        start = first + self._sent_content
        if stop <= start:
            return ""
        self._sent_content += stop - start
        return text[start:stop]
