"""fastmem's benchmarks: the pytest-benchmark suite (test_bench_*.py, suite/) and standalone scripts."""
