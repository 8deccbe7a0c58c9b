"""The one exception type users see: a message that names the problem and the fix."""


class HywiaError(Exception):
    """A user-facing error. The CLI prints it without a traceback and exits with status 2."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
