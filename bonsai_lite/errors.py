"""User-facing errors: one actionable line each; the CLI prints them without a traceback."""


class BonsaiError(Exception):
    """An error whose message tells the user what to do. Raised for bad input, never for bugs."""


class CheckpointError(BonsaiError):
    """Missing, unsupported, corrupt or unsafe model files."""


class BudgetError(BonsaiError):
    """The requested work cannot fit the memory budget."""

    def __init__(self, message: str, *, minimum_bytes: int | None = None):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class DataError(BonsaiError):
    """Calibration or evaluation text that cannot serve the request."""
