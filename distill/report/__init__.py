"""The run's report: :mod:`tables` (the one markdown table writer, used by the ablations too),
:mod:`figures`, :mod:`report` (``report.md``, ``docs/results.md`` and the README's results table,
all read from the run's metrics files)."""
