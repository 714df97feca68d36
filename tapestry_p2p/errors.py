"""The one family of errors a user can fix. Every subclass's message is one line that names the fix; the CLI prints
it after `error: ` and exits 2 (set TAPESTRY_DEBUG=1 for the traceback)."""


class UserError(Exception):
    """A problem the user can fix. Its message is one line that names the fix; the CLI prints it and exits 2."""
