"""The one exception type for mistakes a user can fix (bad file, field, flag or config)."""


class EssenceError(Exception):
    """A user-facing error: the message names what is wrong and how to fix it.

    The command line prints it as one line and exits with status 2, without a traceback.
    """
