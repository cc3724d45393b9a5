"""Reading a results dir: run dirs, metrics files (parsed in a pool, kept in a cache), the row
checks, skip records, benchmark and transfer rows. `load_results` is the entry point."""

from analysis.load.runs import NoResultsError, Results, load_results, select_sweeps

__all__ = ["NoResultsError", "Results", "load_results", "select_sweeps"]
