"""ConvLSTMCell and ConvLSTMForecaster: shapes, the cell's arithmetic, state, gradients."""

import numpy as np
import pytest
import torch

from pipeline.model import CEILING_FACTOR, ConvLSTMCell, ConvLSTMForecaster


@pytest.mark.parametrize("t, h, w, layers, leads", [(6, 32, 32, 1, 1), (3, 17, 23, 2, 6), (1, 5, 9, 3, 2)])
def test_forecaster_shapes_any_time_and_size(t, h, w, layers, leads):
    model = ConvLSTMForecaster(in_channels=2, hidden_channels=8, kernel_size=3, num_layers=layers, leads=leads)
    assert model(torch.randn(2, t, 2, h, w)).shape == (2, leads, 1, h, w)


def test_hidden_channels_per_layer():
    model = ConvLSTMForecaster(hidden_channels=[4, 6], kernel_size=5)
    assert [c.hidden_channels for c in model.cells] == [4, 6]
    assert model(torch.zeros(1, 2, 1, 11, 13)).shape == (1, 1, 1, 11, 13)


def test_cell_step_equals_hand_computation():
    torch.manual_seed(0)
    cell = ConvLSTMCell(in_channels=1, hidden_channels=1, kernel_size=1)
    x = torch.tensor([[[[0.5, -1.0]]]])            # (1, 1, 1, 2)
    h0 = torch.tensor([[[[0.2, 0.1]]]])
    c0 = torch.tensor([[[[-0.3, 0.4]]]])
    h1, c1 = cell(x, (h0, c0))
    w = cell.conv.weight.detach().numpy()[:, :, 0, 0]  # (4 gates, [x, h])
    b = cell.conv.bias.detach().numpy()
    xs, hs, cs = x.numpy()[0, 0, 0], h0.numpy()[0, 0, 0], c0.numpy()[0, 0, 0]
    gates = w[:, :1] * xs + w[:, 1:] * hs + b[:, None]   # (4, 2): i, f, o, g
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    c_expected = sig(gates[1]) * cs + sig(gates[0]) * np.tanh(gates[3])
    h_expected = sig(gates[2]) * np.tanh(c_expected)
    np.testing.assert_allclose(c1.detach().numpy()[0, 0, 0], c_expected, rtol=1e-6)
    np.testing.assert_allclose(h1.detach().numpy()[0, 0, 0], h_expected, rtol=1e-6)


def test_state_is_carried_across_steps():
    torch.manual_seed(0)
    cell = ConvLSTMCell(1, 4, 3)
    x = torch.randn(1, 1, 8, 8)
    h1, c1 = cell(x)
    h2_carried, _ = cell(x, (h1, c1))
    h2_fresh, _ = cell(x)
    assert not torch.allclose(h2_carried, h2_fresh)


def test_gradients_reach_the_first_time_step():
    torch.manual_seed(0)
    model = ConvLSTMForecaster(hidden_channels=8, num_layers=2, predict_delta=False)  # no zero output layer
    x = torch.randn(2, 6, 1, 12, 12, requires_grad=True)
    model(x).sum().backward()
    assert x.grad[:, 0].abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_predict_delta_adds_the_last_input_day():
    torch.manual_seed(0)
    delta = ConvLSTMForecaster(hidden_channels=4, leads=2, predict_delta=True)
    x = torch.randn(1, 3, 1, 6, 6)
    torch.testing.assert_close(delta(x), x[:, -1:, :1].expand(1, 2, 1, 6, 6))  # untrained: persistence
    torch.nn.init.normal_(delta.head[-1].weight)
    plain = ConvLSTMForecaster(hidden_channels=4, leads=2, predict_delta=False)
    plain.load_state_dict(delta.state_dict())
    torch.testing.assert_close(delta(x), plain(x) + x[:, -1:, :1])
    assert not torch.allclose(plain(x), torch.zeros_like(plain(x)))


def test_forcings_enter_the_forecast_and_are_checked():
    torch.manual_seed(0)
    model = ConvLSTMForecaster(hidden_channels=4, leads=2, forcing_channels=4, predict_delta=False)
    x, rain = torch.randn(2, 3, 1, 8, 8), torch.randn(2, 2, 2, 8, 8)
    assert model(x, rain).shape == (2, 2, 1, 8, 8)
    assert not torch.allclose(model(x, rain), model(x, torch.zeros_like(rain)))
    with pytest.raises(ValueError, match="4 forcing channels, got 0"):
        model(x)


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        ConvLSTMCell(1, 4, kernel_size=4)


def test_linear_response_is_linear_in_physical_units():
    """Hand-set gains: the forecast is 0.9 x today plus 2 x the lead day's rain, in physical
    units, whatever the log-space normalisation of either variable."""
    qs, rain = {"mean": 0.7, "std": 1.3, "rms": 4.0}, {"mean": 0.4, "std": 0.8, "rms": 2.0}
    model = ConvLSTMForecaster(leads=1, hidden_channels=4, forcing_channels=1, forcing_scales=[1],
                               linear_response=True, stats=[qs, rain])
    with torch.no_grad():  # gains: [today, yesterday, rain at 1 px, offset]; the features are over each rms
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.tensor([-0.1, 0.0, 2.0 * rain["rms"] / qs["rms"], 0.0]))
    today, rain_ahead = torch.rand(2, 1, 7, 9) * 20, torch.rand(2, 1, 7, 9) * 5
    normalised = lambda v, s: (torch.log1p(v) - s["mean"]) / s["std"]  # noqa: E731
    x = normalised(today, qs).unsqueeze(1).expand(2, 6, 1, 7, 9)
    out = model(x, normalised(rain_ahead, rain).unsqueeze(1))
    physical = torch.expm1(out * qs["std"] + qs["mean"])
    torch.testing.assert_close(physical[:, 0], 0.9 * today + 2.0 * rain_ahead, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantiles", [0, 20])
def test_an_evaluated_model_is_bounded_at_twice_the_training_maximum(quantiles):
    """Outputs pushed far up: in evaluation mode none exceeds CEILING_FACTOR x the training
    days' largest value; training leaves them unbounded (their loss keeps a gradient), and
    a model whose stats carry no maximum (an older checkpoint's) is left as it was."""
    stats = {"mean": 0.5, "std": 1.2, "rms": 3.0, "max": 40.0}
    model = ConvLSTMForecaster(leads=2, hidden_channels=4, quantiles=quantiles, stats=[stats])
    with torch.no_grad():
        model.head[-1].bias.fill_(3.0)  # the change (and every increment) far up: exp(+3 std) and more
    x = torch.randn(2, 6, 1, 5, 6)
    physical = lambda out: torch.expm1(out.detach() * stats["std"] + stats["mean"])  # noqa: E731
    assert physical(model.train()(x)).max() > 3 * CEILING_FACTOR * stats["max"]
    bounded = physical(model.eval()(x))
    assert bounded.max() == pytest.approx(CEILING_FACTOR * stats["max"], rel=1e-4)
    assert (bounded.diff(dim=2) >= 0).all()  # quantiles stay increasing
    unbounded = ConvLSTMForecaster(leads=2, hidden_channels=4, quantiles=quantiles,
                                   stats=[{k: v for k, v in stats.items() if k != "max"}])
    unbounded.load_state_dict(model.state_dict())
    assert unbounded.ceiling() is None
    torch.testing.assert_close(unbounded.eval()(x), model.train()(x))


def test_untrained_linear_response_is_persistence_and_options_are_checked():
    stats = [{"mean": 0.5, "std": 1.0, "rms": 3.0}]
    model = ConvLSTMForecaster(leads=3, quantiles=4, linear_response=True, stats=stats)
    x = torch.randn(2, 6, 1, 5, 6)
    torch.testing.assert_close(model(x).mean(dim=2), x[:, -1, :1].expand(2, 3, 5, 6))
    assert model(x).shape == (2, 3, 4, 5, 6)
    torch.testing.assert_close(model(x[:, -1:]).mean(dim=2), x[:, -1, :1].expand(2, 3, 5, 6))  # one input day
    with pytest.raises(ValueError, match="needs predict_delta"):
        ConvLSTMForecaster(predict_delta=False, linear_response=True, stats=stats)
    with pytest.raises(ValueError, match="needs stats"):
        ConvLSTMForecaster(linear_response=True)
    with pytest.raises(ValueError, match="needs stats"):  # forcings, but no statistics of theirs
        ConvLSTMForecaster(leads=2, forcing_channels=2, linear_response=True, stats=stats)
