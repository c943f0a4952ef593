"""The project's user-facing errors: the CLI prints their message and exits non-zero."""


class StagediffError(Exception):
    """A problem the user can fix (bad input, missing file); printed without a traceback."""


class ConfigError(StagediffError):
    """A bad setting in params.yaml."""


class DataError(StagediffError):
    """A missing, malformed or inconsistent input file."""


class TrainingError(StagediffError):
    """Training diverged (a non-finite loss); the message names the step."""
