"""User-facing errors of dfmpc."""

__all__ = ["DfmpcError"]


class DfmpcError(ValueError):
    """An error the user can fix: bad input, missing file, no internet.

    The message is one line that names the problem and the fix; the command-line
    interface prints it (without a traceback) and exits with status 2.
    """
