"""How a reply splits into reasoning and content at its profile's delimiters (no vLLM here)."""

from __future__ import annotations

from t0s1.profiles import ModelProfile


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


def hold_trailing(text: str, hold: str | None) -> str:
    """``text`` without its trailing whitespace and, with ``hold``, without an end that could be the
    beginning of ``hold``."""
    cut = len(text)
    if hold:
        for size in range(min(len(hold), cut), 0, -1):
            if text.endswith(hold[:size]):
                cut -= size
                break
    return text[:cut].rstrip()
