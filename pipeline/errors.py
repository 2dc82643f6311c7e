"""The exception types the CLI turns into a single readable line and a non-zero exit.

    from pipeline.errors import PipelineError
    raise PipelineError(f"{path}: no column 'prompt' (columns: id, text); set data.prompt_column")
"""


class PipelineError(Exception):
    """A user-facing error: the message names the file, row or key, and what to do next."""


class PeerFailed(PipelineError):
    """Raised on ranks other than 0 when some rank failed during start-up (see Runtime.together):
    rank 0 prints the error, this rank exits non-zero quietly, with the message in its own log file."""
