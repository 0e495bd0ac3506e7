"""The exceptions a user-facing command turns into a clean line and a conventional exit status."""


class UserError(Exception):
    """A mistake the user can fix: bad path, bad flag, bad file.

    The CLI prints ``hmlstm: error: <message>`` and exits with status 2, no
    traceback. The message says what was wrong and what to do.
    """

    status = 2


class ServiceError(UserError):
    """A server that failed the command (unreachable, gone, refusing to resume): one line, exit status 1,
    as `hmlstm health` ends when the server does not answer SERVING."""

    status = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, Kubernetes, a batch scheduler), raised where the process is so that it stops
    like Ctrl-C and its ``finally`` blocks run; the command exits with status 143."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name where it has none), at most ``limit``
    characters: what a one-line error quotes of a library's multi-line one."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line[:limit] if limit else line
