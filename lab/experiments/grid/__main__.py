"""`python -m lab.experiments.grid --run-cell SPEC --outcome FILE`: one cell of a grid as its own
process, the command line a DDP job's ranks run (lab/experiments/grid/cells.py run_ddp_cell)."""

import sys

from lab.experiments.grid.cells import run_cell_main

if __name__ == "__main__":
    sys.exit(run_cell_main(sys.argv[1:]))
