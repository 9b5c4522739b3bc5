"""The single exception type of the data layer."""


class DataError(ValueError):
    """Raised for any problem with real data on disk or in memory.

    Every message names the problem *and* the fix (the expected layout, the
    path that was looked at, the file to remove or replace), because these
    errors are read by people setting up a benchmark, not by code.
    """
