"""The project's one error root. Every public error class of pipeline/ and train/ descends from
DepthsegError, whose message is one sentence for the user; `depthcli` and the trainer catch this
class (not a list that a new error could be missing from) and print it instead of a traceback.
It imports nothing of the project, so any module can take it."""


class DepthsegError(Exception):
    """Bad input or settings, or a run that cannot go on; the message is one sentence for the user."""
