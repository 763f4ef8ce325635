"""What the GUI's tabs share: the allowed roots, the job store, the path targets of the file browser, and the error
handling that turns a UserError into a message on the page (never a traceback)."""

from __future__ import annotations

import functools
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lorakit.errors import UserError
from lorakit.gui.files import Roots
from lorakit.gui.jobs import JobStore


@dataclass
class Context:
    roots: Roots
    store: JobStore
    outputs: Path  # generated images go under here
    # label -> textbox: the file browser's "Use for" targets, registered by the tabs
    targets: dict[str, Any] = field(default_factory=dict)

    def path(self, text: str | None, what: str, must_exist: bool = True, kind: str | None = None) -> Path:
        """A path typed into a field: inside the roots, existing when it is an input."""
        p = self.roots.check(text or "", what)
        if must_exist and not p.exists():
            raise UserError(f"The {what} {text} does not exist.")
        if kind == "dir" and must_exist and not p.is_dir():
            raise UserError(f"The {what} {text} is not a folder.")
        if kind == "file" and must_exist and not p.is_file():
            raise UserError(f"The {what} {text} is not a file.")
        return p

    def optional_path(self, text: str | None, what: str, must_exist: bool = True) -> Path | None:
        return self.path(text, what, must_exist) if text and str(text).strip() else None


def friendly(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def handler(fn: Callable) -> Callable:
    """Gradio event handler: a UserError (or any error) becomes gr.Error with its message; the traceback of an
    unexpected error goes to the server's console only."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        import gradio as gr

        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as exc:
            raise gr.Error(str(exc), duration=None) from None
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            raise gr.Error(friendly(exc), duration=None) from None

    return wrapped


class Captured:
    """Collects the log lines of a library call (its `log=` callback); also echoed to the server console."""

    def __init__(self):
        self.lines: list[str] = []

    def log(self, msg="", *a, **k) -> None:
        self.lines.append(str(msg))
        console(str(msg))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def console(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


__all__ = ["Context", "handler", "friendly", "Captured", "console"]
