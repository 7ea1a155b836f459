"""User-facing errors: one clear line, non-zero exit, no traceback."""


class UsageError(Exception):
    """Bad input from the user (a flag, a file, a combination).

    The message must name the flag or file, what is wrong and what to do. Entry points
    catch it, print ``error: <message>`` and exit with status 2.
    """
