import os

import numpy as np
import pytest
import torch

from robustbench_dyn.data.images import resize_center_crop
from robustbench_dyn.sample import sample_images


def pytest_configure(config):
    # With pytest-xdist (`-n 2`, as the README runs the tests) the workers share the cores: each
    # runs one torch thread, and so do the commands the tests start. Two OpenMP threads per worker
    # on 2 cores spin-waited for each other (the second-derivative tests 5 s -> 41 s, the demo
    # 71 s -> 200 s). Tests of how the kernels split work set their own thread counts.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def photos():
    """The bundled photos, Resize(256) + CenterCrop(224), as ImageNet-C sees them: name -> uint8."""
    return {image.name: resize_center_crop(image.load()) for image in sample_images()}


@pytest.fixture(scope="session")
def reference():
    """imagecorruptions 1.1.2 with the test-only compatibility shims."""
    from imagecorruptions_shim import load_reference

    return load_reference()


@pytest.fixture()
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module. Tiny inputs are overhead-bound; two OpenMP threads on a
    busy 2-core machine ran the model forward/backward tests ~10x slower than one (spin-waiting
    threads get preempted)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
