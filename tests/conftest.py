import os
import sys

import pytest
import torch

# Tests import the top-level scripts (wan, reward, ...) as modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on 2 shared cores: OpenMP workers waiting for each other at every layer cost
    more than a second thread saves. Modules opt in with pytestmark = usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
