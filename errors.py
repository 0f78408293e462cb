"""The one exception type the entry scripts turn into a one-line message. A leaf module: it imports
nothing of this repository, so every other module may import it."""


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, without a traceback, exit code 2."""
    exit_code = 2


class RunFailed(UserError):
    """A run that could not go on, though what was asked was fine (a non-finite loss, a directory in use by
    another run): one line, exit code 1, so the launchers' pool keeps running the other runs."""
    exit_code = 1
