"""ConvLSTMCell and ConvLSTMForecaster: shapes, the cell's arithmetic, state, gradients."""

import numpy as np
import pytest
import torch

from pipeline.model import ConvLSTMCell, ConvLSTMForecaster


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
