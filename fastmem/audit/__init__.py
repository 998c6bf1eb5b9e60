"""Self-checks of an installation: every available backend against the float64 reference."""

from fastmem.audit.selfcheck import CheckResult, environment_report, run_self_checks

__all__ = ["CheckResult", "environment_report", "run_self_checks"]
