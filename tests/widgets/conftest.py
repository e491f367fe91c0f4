"""Widget tests send no messages to a front end: `sent` records what a widget would send."""

from __future__ import annotations

import pytest


@pytest.fixture
def sent(monkeypatch):
    """Replace Widget.send: returns the list of (content, buffers) each widget sends."""
    from widgets._base import Widget

    out: list[tuple[dict, list]] = []
    monkeypatch.setattr(Widget, "send", lambda self, content, buffers=None: out.append((content, buffers or [])))
    return out


def page(widget, content: dict, buffers=None) -> None:
    """Deliver a custom message as the page would (the comm's msg handler path)."""
    widget._handle_custom_msg(content, buffers or [])
