"""The one exception type the entry scripts turn into a one-line message. A leaf module: it imports
nothing of this repository, so every other module may import it."""


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, without a traceback."""
