"""One module per hot path, each `rows(quick: bool) -> list[benchmarks.suite.Row]`; run by `python -m benchmarks`."""
