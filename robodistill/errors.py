"""The one exception type for mistakes a user can fix (bad flag, missing file, wrong task)."""


class UserError(Exception):
    """Raised with a message that names the flag, file or field and the fix.

    The CLI prints it as one line and exits with status 2 instead of showing a traceback.
    """
