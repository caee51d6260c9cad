"""The paper's analyses: the metrics every run records, their plots and their files (the
`gatelab analyze` command: lab/reports/analyze.py)."""
