"""User-facing errors of dfmpc."""

__all__ = ["DfmpcError", "UnreadableImageError"]


class DfmpcError(ValueError):
    """An error the user can fix: bad input, missing file, no internet.

    The message is one line that names the problem and the fix; the command-line
    interface prints it (without a traceback) and exits with status 2.
    """


class UnreadableImageError(DfmpcError):
    """An evaluation image that cannot be decoded (truncated, corrupt, not an image): names the file."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(f"image {path!r} cannot be read ({reason}); replace or remove it, or skip unreadable images "
                         "(dfmpc quantize --skip-unreadable; load_dataset(skip_unreadable=True)), which counts them")
