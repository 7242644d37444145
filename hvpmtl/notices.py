"""Warnings hvpmtl gives a person (a checkpoint passed over, an image panel that failed): shown as one line
`[hvpmtl] warning: ...`, not with the source line of the `warnings.warn` call."""
import warnings


class Notice(UserWarning):
    """A warning about the user's run or files, not about code."""


_python_format = warnings.formatwarning


def _format(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, Notice):
        return f"[hvpmtl] warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


def notice(message: str) -> None:
    warnings.warn(message, Notice, stacklevel=2)


def show_notices_as_lines() -> None:
    """Called by every command's entry point (the input boundary)."""
    warnings.formatwarning = _format
