"""Errors a user can act on. The command line prints them and exits with code 2."""


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and what to do."""


class ModelNotFoundError(UserError):
    """A model name that is neither a local path nor loadable from the hub."""
