"""What hvpmtl shows a person: warnings (a checkpoint passed over, an image panel that failed) as one line
`[hvpmtl] warning: ...`, not with the source line of the `warnings.warn` call; paths and values cut and
with invisible characters escaped."""
import re
import warnings

SHOWN_CHARS = 300  # a path longer than this is shown cut in the middle (a 10 MB "path" is not printed)


def _visible(text: str) -> str:
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def shown(thing, limit: int = SHOWN_CHARS) -> str:
    """A path or value as printed in a message: invisible characters escaped (a BOM shows as \\ufeff), cut in
    the middle to `limit` characters."""
    text = str(thing)
    if len(text) <= limit:
        return _visible(text)
    half = limit // 2
    return f"{_visible(text[:half])}...({len(text) - 2 * half} characters)...{_visible(text[-half:])}"


class Notice(UserWarning):
    """A warning about the user's run or files, not about code."""


_python_format = warnings.formatwarning


def _format(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, Notice):
        return f"[hvpmtl] warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


def shown_message(text: str) -> str:
    """A message that may quote a huge path or value: each run of characters without a space longer than
    SHOWN_CHARS is cut on its own, so the reason and the advice around it stay whole."""
    if len(text) <= SHOWN_CHARS:
        return _visible(text)
    parts = re.split(r"(\S{%d,})" % (SHOWN_CHARS + 1), text)
    return "".join(shown(p) if k % 2 else _visible(p) for k, p in enumerate(parts))


def notice(message: str) -> None:
    warnings.warn(message, Notice, stacklevel=2)


def show_notices_as_lines() -> None:
    """Called by every command's entry point (the input boundary)."""
    warnings.formatwarning = _format
