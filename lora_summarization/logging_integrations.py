"""--report-to: the logging integrations a run names (tensorboard, wandb, mlflow, ...), checked before any model
loads."""

from __future__ import annotations

from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations


def integrations(report_to: str) -> list[str]:
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    return [] if names == ["none"] else names


def report_to_problems(report_to: str) -> list[str]:
    """Unknown or uninstalled logging integrations, found before any model loads."""
    available = get_available_reporting_integrations()
    problems = []
    for name in integrations(report_to):
        if name not in INTEGRATION_TO_CALLBACK:
            problems.append(f"--report-to {name} is unknown; choose from none, {', '.join(INTEGRATION_TO_CALLBACK)}")
        elif name not in available:
            problems.append(f"--report-to {name} needs its package installed (pip install {name})")
    return problems
