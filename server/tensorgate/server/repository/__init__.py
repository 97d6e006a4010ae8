"""The model repository: config files, model files, versions and their lifecycle."""

from tensorgate.server.repository.config import ModelSignature, read_config
from tensorgate.server.repository.repository import (
    ModelEntry,
    ModelVersion,
    Repository,
    RepositorySettings,
    VersionState,
)

__all__ = [
    "ModelEntry",
    "ModelSignature",
    "ModelVersion",
    "Repository",
    "RepositorySettings",
    "VersionState",
    "read_config",
]
