"""Reproduce "How LoRA Remembers?" on SmolLM2 with fastmem's own commands (issue 15).

    python -m benchmarks.reproduce --scale subset    # `make reproduce-cpu`: < 1 h on 2 cores
    python -m benchmarks.reproduce --scale cpu       # the full CPU grids (hours; resumable)
    python -m benchmarks.reproduce --scale cpu --report-only

Every stage is resumable: the grids are `fastmem sweep` databases (finished cells are skipped),
the headline runs are `fastmem train` directories (a finished run is read back, not redone).
The cpu scale's databases are snapshot into benchmarks/results/reproduce/cpu/ (committed) and
restored on a machine that lacks them; the subset always starts from nothing in its --root.
"""
