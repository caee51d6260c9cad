"""A throwaway MLflow store for a test: a copy of an empty, migrated database, and the data
cache that test sessions share. The fixtures that use these are in conftest.py (`store`,
`new_store`); the helpers stay importable for tests that lay a store out themselves."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


def shared_dir() -> Path:
    """Outside the repository, shared by test sessions: the synthetic corpus and an empty,
    migrated MLflow database are deterministic and slow to make."""
    path = Path(tempfile.gettempdir()) / "gatelab-tests"
    path.mkdir(exist_ok=True)
    return path


def template_db() -> Path:
    """An empty MLflow database at the installed MLflow's schema head, made once."""
    import mlflow

    template = shared_dir() / f"mlflow-{mlflow.__version__}.db"
    if not template.exists():
        work = Path(tempfile.mkdtemp(dir=shared_dir()))
        from mlflow.tracking import MlflowClient

        MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_experiments()
        os.replace(work / "mlflow.db", template)  # whole or not at all, for parallel sessions
        shutil.rmtree(work, ignore_errors=True)
    return template


@dataclass(frozen=True)
class Store:
    """A store folder (what GATELAB_STORE names) and how a process is pointed at it."""

    root: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def env(self) -> dict[str, str]:
        """GATELAB_STORE and GATELAB_CACHE (the shared cache), for os.environ or a child's
        environment."""
        return {"GATELAB_STORE": str(self.root), "GATELAB_CACHE": str(shared_dir() / "cache")}


def make_store(root: Path, migrated: bool = True) -> Store:
    """The store folder `root`, holding a copy of the migrated empty database, or nothing
    (`migrated=False`: the first command that opens it creates the database)."""
    root.mkdir(parents=True, exist_ok=True)
    if migrated:
        shutil.copy(template_db(), root / "mlflow.db")
    return Store(root)
