"""The one exception type the CLI turns into a single readable line and a non-zero exit.

    from pipeline.errors import PipelineError
    raise PipelineError(f"{path}: no column 'prompt' (columns: id, text); set data.prompt_column")
"""


class PipelineError(Exception):
    """A user-facing error: the message names the file, row or key, and what to do next."""
