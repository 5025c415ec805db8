import pytest

from tiny_workspace import make_workspace


@pytest.fixture(scope="package")
def ws(tmp_path_factory):
    """Two tiny clips: the cheapest real workspace (mp4 data, tiny T5/CLIP/WFVAE)."""
    return make_workspace(tmp_path_factory.mktemp("faults_ws"), num=2, cfg_rate=0.0)
