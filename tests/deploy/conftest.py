from __future__ import annotations

import pytest

from tests.deploy import kube


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[kube.Doc]]:
    """Every kustomization rendered once for the whole session."""
    return {path: kube.render(path) for path in kube.KUSTOMIZATIONS}
