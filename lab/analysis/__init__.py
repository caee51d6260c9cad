"""The paper's analyses: the metrics every run records, their plots and files, and
`gatelab analyze`."""
