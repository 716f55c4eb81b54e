"""Errors the trainer reports as a clean `Failed` result (never a bare traceback).

Exit codes: `perennial.api.exitcodes` (the one table, shared with the Job builder's podFailurePolicy).
"""

from perennial.api.exitcodes import exit_code_for


class TrainerError(Exception):
    """A user-facing failure: bad config, missing data, missing column, ...

    `reason` is a CamelCase machine-readable reason copied to the termination message; it decides
    the exit code (permanent failures end the Job at once, others are retried).
    """

    def __init__(self, message: str, reason: str = "TrainerError", metrics: dict[str, float] | None = None):
        super().__init__(message)
        self.reason = reason
        self.metrics = metrics  # what the run measured before it failed (e.g. an adapter worse than its parent)

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.reason)
