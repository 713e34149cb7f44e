"""The one exception type for mistakes a user can fix (bad flag, missing file, wrong task), and its kind for
a run that something outside it cut short."""


class UserError(Exception):
    """Raised with a message that names the flag, file or field and the fix.

    The CLI prints it as one line and exits with status 2 instead of showing a traceback.
    """


class CutShort(UserError):
    """A run stopped partway by something outside it (a served policy that went away), not by bad input:
    the CLI adds, as after Ctrl-C, how a training command's run continues."""
