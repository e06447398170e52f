"""Shared fixtures: feature networks with random weights scaled so activations keep their size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfm.evaluation.inception import InceptionV3


def scaled_random_inception(seed: int = 0) -> InceptionV3:
    """InceptionV3 with He-initialised convs and non-trivial BatchNorm statistics.

    PyTorch's default conv init shrinks activations ~3x per layer, so after 90+ layers the features are
    ~1e-8 and every metric would be trivially 0; He init keeps them O(1) and the tests meaningful.
    """
    torch.manual_seed(seed)
    model = InceptionV3()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.8, 1.2)
            m.bias.data.uniform_(-0.1, 0.1)
    nn.init.normal_(model.fc.bias)
    return model.eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Run these tests on one intra-op thread, restoring the setting afterwards.

    On a 2-core runner shared with other jobs, two OpenMP threads spin against each other: one Inception
    forward of 2 images took 1.1 s on one thread and 5-6.6 s on two. The batches here are too small to
    gain from threading anyway.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def inception_model() -> InceptionV3:
    return scaled_random_inception()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory, inception_model) -> str:
    """The random Inception's state dict saved as pytorch-fid's file is (no BatchNorm step counters)."""
    state = {k: v for k, v in inception_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(state, path)
    return str(path)
