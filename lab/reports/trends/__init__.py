"""The paper's trends (../shared/paper/GATED_ATTENTION.md §6; docs/paper.md §10) as paired
tests on a grid's runs, by concern: what a comparison measures (measures.py), the trends and
the variants they compare (definitions.py), the statistics (statistics.py), the verdict rules
(verdicts.py, whose top states them) and the tables report.md prints (table.py)."""
