"""User-facing errors.

Anything the user can fix (an unknown model, a dataset that is not prepared, a bad
flag, a corrupt checkpoint, a diverged run) is raised as a :class:`UserError` whose
message names the problem *and* the fix in one line. The CLI prints it without a
traceback and exits with status 2 (``--debug`` shows the traceback).
"""


class UserError(Exception):
    """An error caused by the user's input, with a one-line message that says how to fix it."""


class DatasetNotPreparedError(UserError):
    """The requested dataset has not been prepared in the data directory."""


class TrainingDivergedError(UserError):
    """The loss (or the model state) became NaN/inf; the run stopped without saving that state.

    Attributes:
      step: the first step seen with a non-finite value.
    """

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
