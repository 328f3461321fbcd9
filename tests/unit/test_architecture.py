"""The import rules of docs/architecture.md hold in the code: import-linter's contracts in
pyproject.toml (layers, forbidden imports, no cycles) and two allow-lists they cannot express.
Every import statement counts, function-local ones included."""

from __future__ import annotations

import sys
from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "runtime", "producers", "consumers", "dashboards", "benchmarks")

# What the dashboard may use of the consumers: their client modules, never a consumer's process.
DASHBOARD_CONSUMER_MODULES = {
    "consumers.control_client",  # the Run page's control panel sends commands like `trainbus ctl`
    "consumers.predict.client",  # Try it asks the predictor like `trainbus predict`
    "consumers.sweep.study",  # the Sweeps page reads the Optuna study
}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, include_external_packages=True, cache_dir=None)


def _imported_by(graph: grimp.ImportGraph, package: str) -> dict[str, set[str]]:
    """Each module outside ``package`` that ``package`` imports directly, with its importers."""
    found: dict[str, set[str]] = {}
    for module in graph.find_descendants(package) | {package}:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] != package:
                found.setdefault(imported, set()).add(module)
    return found


def test_the_import_contracts_in_pyproject_hold(capsys: pytest.CaptureFixture[str]) -> None:
    status = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    assert status == 0, capsys.readouterr().out


def test_schemas_import_only_pydantic_and_the_standard_library(graph: grimp.ImportGraph) -> None:
    allowed = set(sys.stdlib_module_names) | {"__future__", "pydantic", "pydantic_core", "annotated_types"}
    others = {name: sorted(by) for name, by in _imported_by(graph, "schemas").items() if name not in allowed}
    assert not others, f"schemas imports {others}"


def test_the_dashboard_uses_only_the_consumers_client_modules(graph: grimp.ImportGraph) -> None:
    imported = _imported_by(graph, "dashboards")
    consumers = {name: sorted(by) for name, by in imported.items() if name.split(".")[0] == "consumers"}
    extra = {name: by for name, by in consumers.items() if name not in DASHBOARD_CONSUMER_MODULES}
    assert not extra, f"the dashboard imports consumer modules beyond their clients: {extra}"
