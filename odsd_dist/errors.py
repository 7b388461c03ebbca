"""User-facing errors: one clear message naming the offending key or path, exit code 2."""


class UserError(Exception):
    """A bad config, path or input table. The CLI prints it and exits with code 2, before any Ray work."""

    exit_code = 2
