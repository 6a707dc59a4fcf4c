"""Shared fixtures. Ray and MLflow servers are started by the tests that need them."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)
