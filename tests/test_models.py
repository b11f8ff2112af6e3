import pytest
import torch
from hydra.utils import instantiate

from fedsim.errors import ConfigError
from fedsim.models import MLP, ConvNet, LogisticRegression, build_model, resnet18_gn
from tests.conftest import compose


@pytest.mark.parametrize(
    "factory,shape",
    [
        (LogisticRegression, (2,)),
        (MLP, (1, 8, 8)),
        (ConvNet, (1, 28, 28)),
        (
            lambda s, c: ConvNet(s, c, channels=(6, 16), padding=2, hidden=(120, 84), activation="tanh", pool="avg"),
            (1, 28, 28),
        ),
        (lambda s, c: ConvNet(s, c, channels=(32, 32), kernel=3, padding=1, hidden=(256, 64)), (3, 32, 32)),
        (resnet18_gn, (3, 32, 32)),
    ],
)
def test_models_map_batches_to_logits_without_buffers(factory, shape):
    model = build_model(factory, shape, 10, seed=0)
    assert model(torch.zeros(3, *shape)).shape == (3, 10)
    assert not list(model.buffers())


def test_reference_cnn_has_the_issue_architecture():
    model = instantiate(compose("model=cnn").model)((1, 28, 28), 10)
    sizes = [tuple(p.shape) for p in model.parameters()]
    assert sizes == [(16, 1, 5, 5), (16,), (32, 16, 5, 5), (32,), (128, 512), (128,), (10, 128), (10,)]


def test_initial_weights_follow_the_seed_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a = torch.nn.utils.parameters_to_vector(build_model(MLP, (4,), 3, seed=1).parameters())
    b = torch.nn.utils.parameters_to_vector(build_model(MLP, (4,), 3, seed=1).parameters())
    c = torch.nn.utils.parameters_to_vector(build_model(MLP, (4,), 3, seed=2).parameters())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.random.get_rng_state())


def test_convnet_on_too_small_images_is_a_config_error():
    with pytest.raises(ConfigError, match="too small"):
        ConvNet((1, 8, 8), 10)
    with pytest.raises(ConfigError, match="image inputs"):
        ConvNet((20,), 10)
