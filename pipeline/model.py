"""ConvLSTM forecaster: a stack of :class:`ConvLSTMCell` over the input days, then a small
convolutional head that emits one map per lead time.

Inside the recurrence, the last input day only reaches ``kernel_size // 2`` pixels per
layer before the output; the head (one ``head_kernel`` convolution, applied once) widens
that cheaply, so features that drift a few pixels a day can be followed.

Example
-------
>>> import torch
>>> model = ConvLSTMForecaster(in_channels=1, hidden_channels=16, kernel_size=3, leads=2)
>>> model(torch.zeros(4, 6, 1, 33, 47)).shape
torch.Size([4, 2, 1, 33, 47])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step (Shi et al., 2015): the four gates come from one convolution
    over the concatenated ``[input, hidden]``, so spatial context enters every gate."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the map size, got {kernel_size}")
        self.hidden_channels = hidden_channels
        self.conv = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                              padding=kernel_size // 2, bias=bias)

    def init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero hidden and cell state matching input ``x`` of shape (B, C, H, W)."""
        b, _, h, w = x.shape
        zeros = x.new_zeros(b, self.hidden_channels, h, w)
        return zeros, zeros.clone()

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance one step; returns the new ``(hidden, cell)``."""
        h, c = self.init_state(x) if state is None else state
        i, f, o, g = torch.chunk(self.conv(torch.cat([x, h], dim=1)), 4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`ConvLSTMForecaster`; stored in every checkpoint."""

    in_channels: int = 1
    hidden_channels: list[int] = field(default_factory=lambda: [16])
    kernel_size: int = 3
    leads: int = 1
    predict_delta: bool = False
    head_kernel: int = 5

    def to_dict(self) -> dict:
        return asdict(self)


class ConvLSTMForecaster(nn.Module):
    """Input ``(B, T, C, H, W)`` -> forecast ``(B, L, 1, H, W)`` for L lead times.

    Any T, H and W (odd sizes too). ``hidden_channels`` is an int (repeated
    ``num_layers`` times) or one int per layer. With ``predict_delta`` the network
    predicts the change from the last input day of channel 0 (the target variable).
    """

    def __init__(self, in_channels: int = 1, hidden_channels: int | Sequence[int] = 16, kernel_size: int = 3,
                 num_layers: int = 1, leads: int = 1, predict_delta: bool = False, head_kernel: int = 5) -> None:
        super().__init__()
        hidden = [hidden_channels] * num_layers if isinstance(hidden_channels, int) else list(hidden_channels)
        if not hidden or min(hidden) < 1 or leads < 1 or in_channels < 1:
            raise ValueError("need in_channels >= 1, leads >= 1 and at least one layer of >= 1 hidden channels")
        if head_kernel % 2 == 0:
            raise ValueError(f"head_kernel must be odd to keep the map size, got {head_kernel}")
        self.config = ModelConfig(in_channels, hidden, kernel_size, leads, predict_delta, head_kernel)
        self.cells = nn.ModuleList(
            ConvLSTMCell(c_in, c_out, kernel_size)
            for c_in, c_out in zip([in_channels] + hidden[:-1], hidden))
        self.head = nn.Sequential(
            nn.Conv2d(hidden[-1], hidden[-1], head_kernel, padding=head_kernel // 2), nn.GELU(),
            nn.Conv2d(hidden[-1], leads, kernel_size=1))

    @classmethod
    def from_config(cls, config: dict) -> "ConvLSTMForecaster":
        cfg = ModelConfig(**config)
        return cls(cfg.in_channels, cfg.hidden_channels, cfg.kernel_size, leads=cfg.leads,
                   predict_delta=cfg.predict_delta, head_kernel=cfg.head_kernel)

    def receptive_radius(self, input_days: int) -> int:
        """How far (pixels) an output pixel sees: every step of every layer widens the
        view by ``kernel_size // 2``, and the head by ``head_kernel // 2``."""
        return input_days * len(self.cells) * (self.config.kernel_size // 2) + self.config.head_kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected input (batch, time, channels, height, width), got {tuple(x.shape)}")
        states: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.cells)
        for t in range(x.shape[1]):
            layer_input = x[:, t]
            for k, cell in enumerate(self.cells):
                states[k] = cell(layer_input, states[k])
                layer_input = states[k][0]
        out = self.head(layer_input).unsqueeze(2)  # (B, L, 1, H, W)
        if self.config.predict_delta:
            out = out + x[:, -1, :1].unsqueeze(1)
        return out
