"""Errors the trainer reports as a clean `Failed` result (never a bare traceback)."""


class TrainerError(Exception):
    """A user-facing failure: bad config, missing data, missing column, ...

    `reason` is a CamelCase machine-readable reason copied to the termination message.
    """

    def __init__(self, message: str, reason: str = "TrainerError"):
        super().__init__(message)
        self.reason = reason
