import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_working_directory(tmp_path, monkeypatch):
    """Every test runs in its own empty working directory: what was left in the directory pytest started in (the
    `runs/` of a `gradest run`, a `results/`) cannot change a result. Files of the repository: helpers.REPO."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second intra-op thread; on a busy machine it only stalls. Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
