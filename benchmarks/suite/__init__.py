"""The benchmark suite's tables (cases.py), contenders (contenders.py) and measurements (measure.py)."""
