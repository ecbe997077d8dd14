"""train/model.py: every network's shapes, output range and gradient flow; the reference's exact
size; the unet family's receptive field, any input size and width multiplier; dropout; the registry."""

import pytest
import torch

from train.model import MODELS, build_model

UNET_PARAMS = 3_881_906  # the default model

def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_reference_has_exactly_the_reference_parameter_count():
    assert n_params(build_model("reference")) == 3_165_170


def test_parameter_count_does_not_depend_on_dropout():
    assert n_params(build_model("reference", dropout=0.0)) == n_params(build_model("reference", dropout=0.5))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("h,w,b", [(64, 64, 2), (224, 224, 1), (36, 52, 1)])
def test_output_shapes_and_range(name, h, w, b):
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():
        mask, depth = model(torch.rand(b, 6, h, w))
    assert mask.shape == depth.shape == (b, 1, h, w)
    for out in (mask, depth):
        assert out.dtype == torch.float32
        assert 0.0 <= out.min().item() and out.max().item() <= 1.0


@pytest.mark.parametrize("name", ["reference", "unet"])
@pytest.mark.parametrize("bias", [-10.0, 10.0])
def test_outputs_are_squashed_into_unit_range(name, bias):
    """Push the last convs' outputs far outside [0, 1]: the maps must still land inside it."""
    torch.manual_seed(0)
    model = build_model(name).eval()
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1]
    assert len(heads) == 2
    with torch.no_grad():
        for conv in heads:
            conv.bias.fill_(bias)
        for out in model(torch.rand(1, 6, 32, 32)):
            assert 0.0 <= out.min().item() and out.max().item() <= 1.0
            assert out.mean().item() == pytest.approx(0.0 if bias < 0 else 1.0, abs=0.01)


def test_size_not_multiple_of_four_is_refused():
    with pytest.raises(ValueError, match="multiples of 4"):
        build_model("reference")(torch.rand(1, 6, 30, 32))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_receives_a_gradient(name):
    """Every stream, stage and both decoders take part: none of the counted parameters is dead weight."""
    model = build_model(name)
    mask, depth = model(torch.rand(2, 6, 64, 64))
    (mask.mean() + depth.mean()).backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def _train_mode_with_frozen_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Training mode for everything but BatchNorm, so only dropout can change the output."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def dropout_rates(model: torch.nn.Module) -> set[float]:
    return {m.p for m in model.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))}


def test_dropout_rate_reaches_every_dropout_layer():
    assert dropout_rates(build_model("reference")) == {0.2}  # the reference default
    assert dropout_rates(build_model("reference", dropout=0.35)) == {0.35}
    assert dropout_rates(build_model("unet", dropout=0.35)) == {0.35}


def test_the_unet_family_sizes():
    """Named sizes scale every width; the early-fusion encoder sees bg, fg_bg and |fg_bg - bg|."""
    counts = {name: n_params(build_model(name)) for name in ("unet-s", "unet", "unet-l")}
    assert counts["unet-s"] < counts["unet"] < counts["unet-l"]
    assert counts["unet"] == UNET_PARAMS
    model = build_model("unet", dropout=0).eval()
    seen = []
    model.encoder.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    bg = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        model(torch.cat([bg, bg + 0.25], 1))
    assert seen[0].shape[1] == 9 and torch.allclose(seen[0][:, 6:], torch.full_like(bg, 0.25), atol=1e-6)


@pytest.mark.parametrize("name, covers", [("unet", True), ("reference", False)])
def test_receptive_field_covers_a_224px_image(name, covers):
    """The depth at the centre depends on the image's corners in the unet (its bottleneck is at
    H/32), not in the reference network (a receptive field of about 53 px)."""
    torch.manual_seed(0)
    model = build_model(name, dropout=0).eval()
    x = torch.rand(1, 6, 224, 224, requires_grad=True)
    model(x)[1][0, 0, 112, 112].backward()
    corners = x.grad[0, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert bool((corners != 0).all()) == covers
    assert x.grad[0, :, 112, 112].abs().sum() > 0


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_dropout_is_what_differs_between_train_and_eval(p):
    torch.manual_seed(0)
    model = build_model("reference", dropout=p)
    x = torch.rand(2, 6, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
        out = _train_mode_with_frozen_bn(model)(x)
    same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ref, out))
    assert same == (p == 0.0)  # with dropout on, training mode must differ from eval


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="reference"):
        build_model("resnet-9000")
    assert "reference" in MODELS
