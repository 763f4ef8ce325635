"""User-facing errors.

Anything the user can fix (a bad path, a wrong flag, a corrupt file) raises UserError with one paragraph that names
the file or field and says what to do. The CLI prints it without a traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; its message is shown as is."""
