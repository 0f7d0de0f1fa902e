"""Speed benchmarks of the twa:: ops and the TWA step (pytest-benchmark); see README.md."""
