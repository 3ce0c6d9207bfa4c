"""The web page of ``t0s1 serve``: chat with the thinking in view, budget controls, a compare view.

``mount_ui(app, info=UIInfo.describe(...))`` adds ``GET /`` (the page), ``/ui/static/...`` (its
script and style sheet, shipped in the package: no build step, no CDN) and ``GET /ui/info`` (what
the page needs to know about the server). The page talks to the server's own OpenAI-compatible
API, ``POST /v1/chat/completions`` with ``stream: true``, like any other client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from t0s1.forcing import BudgetForcing
from t0s1.models import LoadedModel

STATIC_DIR = Path(__file__).with_name("static")

# The page loads nothing but its own files and talks only to this server; no inline script runs,
# so even markup that slipped into the DOM could not execute.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class ReasoningFormatInfo(BaseModel):
    """The model's reasoning profile (``t0s1.profiles``) as the server detected or was told it."""

    name: str
    thinking_start: str
    thinking_end: str
    reasons: list[str] = []
    """Why this profile was chosen (``t0s1 generate --explain-format``), when detected."""


class BudgetDefaults(BaseModel):
    """The server's budget forcing for fields a request leaves out (the page's initial controls)."""

    max_thinking_tokens: int | Literal["auto"]
    num_ignore: int
    ignore_str: str
    max_answer_tokens: int
    temperature: float


class UIInfo(BaseModel):
    """``GET /ui/info``: what the page shows and asks before the first request."""

    model: str
    reasoning_format: ReasoningFormatInfo
    defaults: BudgetDefaults
    api_key_required: bool
    retrieval: bool = False
    """Whether replies may carry ``sources`` (the page shows them only when a reply has some)."""

    @classmethod
    def describe(cls, lm: LoadedModel, defaults: BudgetForcing, *, api_key_required: bool,
                 retrieval: bool = False) -> UIInfo:
        profile = lm.profile
        reasons = list(lm.detection.reasons) if lm.detection else []
        return cls(
            model=lm.name,
            reasoning_format=ReasoningFormatInfo(name=profile.name, thinking_start=profile.thinking_start,
                                                 thinking_end=profile.thinking_end, reasons=reasons),
            defaults=BudgetDefaults(max_thinking_tokens=defaults.max_thinking_tokens, num_ignore=defaults.num_ignore,
                                    ignore_str=defaults.ignore_str, max_answer_tokens=defaults.max_answer_tokens,
                                    temperature=defaults.temperature),
            api_key_required=api_key_required,
            retrieval=retrieval,
        )


def mount_ui(app: FastAPI, *, info: UIInfo) -> None:
    """Serve the page at ``/``. ``/ui/info`` stays open like ``/health``: it says whether a key is
    needed (so the page can ask for it) and nothing a key protects."""

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                                "Cache-Control": "no-cache"})

    @app.get("/ui/info", response_model=UIInfo)
    async def ui_info() -> UIInfo:
        return info

    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
