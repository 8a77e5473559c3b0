"""User-facing errors: one clear line, exit code 2, no traceback."""


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing file, mismatched shapes).

    The CLI prints ``error: <message>`` and exits with code 2. Raise it with a
    message that names the problem and what to do about it.
    """

    exit_code = 2
