"""The one exception type a user-facing command turns into a clean error line."""


class UserError(Exception):
    """A mistake the user can fix: bad path, bad flag, bad file.

    The CLI prints ``hmlstm: error: <message>`` and exits with status 2, no
    traceback. The message says what was wrong and what to do.
    """
