"""The reading side: a finished run, read only through its output contract (``open_run``)."""

from cdam_worker.reading.run import Run, RunError, ShardInfo, open_run

__all__ = ["Run", "RunError", "ShardInfo", "open_run"]
