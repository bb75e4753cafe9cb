"""Errors that name what is wrong with the user's input (the CLI turns them into one line, exit 2)."""


class InputError(ValueError):
    """Bad user input: a malformed spec, a shape mismatch, an out-of-range argument.

    The message names the field and the value that was expected.
    """


class NumericalError(FloatingPointError):
    """A sampler produced NaN or Inf (for example a diverged network); the message names where."""


class WeakConvergenceFailure(RuntimeError):
    """Giles' MLMC driver reached Lmax without the bias test passing.

    ``result`` holds the estimate computed so far, so nothing already sampled is lost.
    """

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
