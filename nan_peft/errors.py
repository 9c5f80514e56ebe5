"""The one exception type users need to catch."""


class NanPeftError(ValueError):
    """Bad input or an impossible request, with a one-line message that names the culprit."""
