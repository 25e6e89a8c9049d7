"""ConvLSTM forecaster: a stack of :class:`ConvLSTMCell` over the input days, then a small
convolutional head that emits one map per lead time.

Inside the recurrence, the last input day only reaches ``kernel_size // 2`` pixels per
layer before the output; the head (one ``head_kernel`` convolution, applied once) widens
that cheaply, so features that drift a few pixels a day can be followed.

Forcings, inputs known on the lead days (a rain forecast), enter the head beside the last
hidden state: runoff tomorrow answers to rain tomorrow, which no past input holds. A river
cell answers to the rain over its whole upstream area, so the head sees each forcing also
as box means over ``forcing_scales`` pixels (stride 1, so that tiles still agree). By
default the network forecasts the change from the last input day of the target, and its
output layer starts at zero, so an untrained model is persistence.

With ``linear_response`` the change is formed in physical units, as a linear response whose
gains the network sets per pixel and lead: ``q(t+L) = q(t) + sum_k a_k q(t-k) + sum_j b_j
F_j + c``, over the last :data:`RESPONSE_DAYS` days of the target and every forcing
feature (each lead day, variable and box size) in its own units. A linear store drains
by a fixed share of its water and fills in proportion to the rain over its area, in
physical units; in the log space the network reads its inputs in, the same response is
curved and the few wet cells that dominate the MSE are the hardest to fit. ``stats``
(the target's normalisation statistics, then each forcing's) convert between the two.

A probabilistic model (``quantiles=Q``) emits, per pixel and lead, Q quantiles at the levels
:func:`quantile_levels` (``(k + 0.5) / Q``): a centre plus Q - 1 non-negative increments
(softplus), so the quantiles never cross. Trained by the pinball loss they form the
forecast distribution, which can put its mass at zero and keep a long right tail; their
mean is the deterministic forecast. A buffer ``spread_scale`` (one factor per lead, 1
while training) widens or narrows them around their centre once training has calibrated
it on the validation split; a buffer ``lower_spread`` (one factor per lead, at least 1)
widens, before that, the quantiles below the centre alone, as far as the training days ask
(:func:`widen_below`). With ``quantile_location`` the quantiles sit off the centre by a
location output of their own: the centre is then trained apart (by the MSE, as a
deterministic model's), and ``forward(..., with_centre=True)`` returns it before them. A
``level_calibration`` (fitted on the validation split after training, see
:meth:`ConvLSTMForecaster.set_level_calibration`) then reads each pixel's quantiles at the
levels the truth reached on validation pixels of a like median, per lead. A buffer
``mean_at_centre`` (per lead, 0 or 1, set by ``--calibrate_location``) moves a located model's
quantiles, pixel by pixel, so that their mean in data units is the centre's
(:func:`moved_to_centre`).

In evaluation mode every output is bounded at :data:`CEILING_FACTOR` times the largest
target value of the training days (the ``max`` of the target's ``stats``): summed
increments can put a top quantile at 15 times the record flood.

Example
-------
>>> import torch
>>> model = ConvLSTMForecaster(in_channels=1, hidden_channels=16, kernel_size=3, leads=2)
>>> model(torch.zeros(4, 6, 1, 33, 47)).shape
torch.Size([4, 2, 1, 33, 47])
>>> rain = ConvLSTMForecaster(in_channels=1, leads=2, forcing_channels=2)   # rain on lead days 1, 2
>>> rain(torch.zeros(4, 6, 1, 33, 47), torch.zeros(4, 2, 1, 33, 47)).shape
torch.Size([4, 2, 1, 33, 47])
>>> ConvLSTMForecaster(in_channels=1, leads=2, quantiles=20)(torch.zeros(4, 6, 1, 33, 47)).shape
torch.Size([4, 2, 20, 33, 47])
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import nn

RESPONSE_DAYS = 2  # past days of the target a linear response reads: its level and its trend
QUANTILES = 20  # quantile levels of a probabilistic model: 0.025, 0.075, ..., 0.975
_SPACING_OFFSET = 3.0  # softplus(-3) = 0.05: an untrained model's quantiles lie close together
# A trained model's forecasts are bounded at this many times the largest value of the training
# days: an upper quantile far above any flow the record holds is an artefact of the summed
# increments, not a forecast (docs/skill.md, "A ceiling on the forecasts")
CEILING_FACTOR = 2.0


def quantile_levels(count: int) -> torch.Tensor:
    """The ``count`` evenly spaced levels ``(k + 0.5) / count`` a probabilistic model emits.

    >>> quantile_levels(4).tolist()
    [0.125, 0.375, 0.625, 0.875]
    """
    return (torch.arange(count, dtype=torch.float32) + 0.5) / count


def quantiles_median(quantiles: torch.Tensor) -> torch.Tensor:
    """The median of Q increasing quantiles (..., Q, H, W) at :func:`quantile_levels`: the
    mean of the middle two (the middle one for odd Q), (..., H, W). The class key of a
    level calibration, when it is fitted and when it is applied."""
    q = quantiles.shape[-3]
    return 0.5 * (quantiles[..., (q - 1) // 2, :, :] + quantiles[..., q // 2, :, :])


def pinball_per_level(quantiles: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Pinball loss of each of the quantiles (..., Q, H, W) at :func:`quantile_levels` against
    ``truth`` (..., 1, H, W): (..., Q, H, W).

    >>> pinball_per_level(torch.tensor([1.0, 3.0]).view(2, 1, 1), torch.tensor([[[2.0]]])).flatten().tolist()
    [0.25, 0.25]
    """
    levels = quantile_levels(quantiles.shape[-3]).to(quantiles.device).view(-1, 1, 1)
    error = truth - quantiles
    return torch.maximum(levels * error, (levels - 1) * error)


def pinball(quantiles: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """:func:`pinball_per_level` averaged over the levels: (..., 1, H, W). Twice it is the CRPS
    of the distribution the quantiles describe, as Q grows: the probabilistic model's training
    loss and the score its calibration minimises."""
    return pinball_per_level(quantiles, truth).mean(dim=-3, keepdim=True)


def widen_below(deviations: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Quantiles' ``deviations`` (B, L, Q, H, W) from their centre with those below it (the
    negative ones) times ``factors`` (one per lead): the lower side of the distribution
    widened, the upper side as it is. The order of the quantiles is kept for factors > 0.

    >>> widen_below(torch.tensor([-1.0, 0.5, 2.0]).view(1, 1, 3, 1, 1), torch.tensor([2.0])).flatten().tolist()
    [-2.0, 0.5, 2.0]
    """
    return torch.where(deviations < 0, deviations * factors.to(deviations.dtype).view(1, -1, 1, 1, 1), deviations)


def box_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of each ``size x size`` neighbourhood of ``x`` (B, C, H, W), over the pixels
    inside the map (no zero padding pulls edges down); cost independent of ``size``.

    >>> box_mean(torch.ones(1, 1, 4, 5), 3).unique().tolist()
    [1.0]
    """
    if size == 1:
        return x
    r = size // 2

    def window_sums(t: torch.Tensor, dim: int) -> torch.Tensor:
        padded = torch.nn.functional.pad(t.movedim(dim, -1), (r + 1, r))  # zeros outside
        c = padded.float().cumsum(-1)
        return (c[..., size:] - c[..., :-size]).movedim(-1, dim)

    ones = torch.ones(1, 1, *x.shape[-2:], dtype=torch.float32, device=x.device)
    sums = window_sums(window_sums(x, -1), -2)
    counts = window_sums(window_sums(ones, -1), -2)
    return (sums / counts).to(x.dtype)


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
    predict_delta: bool = True
    head_kernel: int = 5
    forcing_channels: int = 0  # forcing variables x lead days entering the head
    forcing_scales: list[int] = field(default_factory=lambda: [1, 9, 33, 65])  # box sizes the head sees them at
    quantiles: int = 0  # 0: one value per pixel and lead; Q: Q quantiles (a probabilistic model)
    linear_response: bool = False  # the change as a linear response in physical units (needs stats)
    stats: list[dict[str, float]] = field(default_factory=list)  # mean, std, rms, max: target, then each forcing
    quantile_location: bool = False  # quantiles placed by a location of their own, off the centre
    # per lead: {"centres": K medians (normalised), "levels": K x Q levels the quantiles are read at}
    level_calibration: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ConvLSTMForecaster(nn.Module):
    """Input ``(B, T, C, H, W)`` -> forecast ``(B, L, 1, H, W)`` for L lead times.

    Any T, H and W (odd sizes too). ``hidden_channels`` is an int (repeated
    ``num_layers`` times) or one int per layer. With ``predict_delta`` (the default) the
    network predicts the change from the last input day of channel 0 (the target variable)
    and starts as persistence. ``forcing_channels``: the size of the flattened forcings
    ``(B, days, variables, H, W)`` given to :meth:`forward`. ``quantiles``: Q > 1 makes
    the output ``(B, L, Q, H, W)``, Q increasing quantiles per pixel and lead.
    ``linear_response`` (with ``stats``: the normalisation statistics of the target, then of
    each forcing variable) forms the change in physical units, linear in the last days and
    the forcings; the output stays in the normalised space the inputs are in.
    """

    def __init__(self, in_channels: int = 1, hidden_channels: int | Sequence[int] = 16, kernel_size: int = 3,
                 num_layers: int = 1, leads: int = 1, predict_delta: bool = True, head_kernel: int = 5,
                 forcing_channels: int = 0, forcing_scales: Sequence[int] = (1, 9, 33, 65),
                 quantiles: int = 0, linear_response: bool = False,
                 stats: Sequence[dict[str, float]] = (), quantile_location: bool = False,
                 level_calibration: Sequence[dict] = ()) -> None:
        super().__init__()
        hidden = [hidden_channels] * num_layers if isinstance(hidden_channels, int) else list(hidden_channels)
        if not hidden or min(hidden) < 1 or leads < 1 or in_channels < 1:
            raise ValueError("need in_channels >= 1, leads >= 1 and at least one layer of >= 1 hidden channels")
        if head_kernel % 2 == 0:
            raise ValueError(f"head_kernel must be odd to keep the map size, got {head_kernel}")
        if any(k < 1 or k % 2 == 0 for k in forcing_scales):
            raise ValueError(f"forcing_scales must be odd sizes >= 1, got {list(forcing_scales)}")
        if quantiles == 1 or quantiles < 0:
            raise ValueError(f"quantiles must be 0 (deterministic) or >= 2, got {quantiles}")
        if linear_response and not predict_delta:
            raise ValueError("linear_response forms the change from the last day: it needs predict_delta")
        forcing_variables = len(stats) - 1
        if linear_response and (forcing_variables < 0 or (forcing_channels > 0) != (forcing_variables > 0)
                                or (forcing_variables and forcing_channels % forcing_variables)):
            raise ValueError("linear_response needs stats for the target and each forcing variable")
        self.config = ModelConfig(in_channels, hidden, kernel_size, leads, predict_delta, head_kernel,
                                  forcing_channels, list(forcing_scales), quantiles, linear_response,
                                  [dict(v) for v in stats], bool(quantiles and quantile_location))
        # per lead: a value (or a linear response's gains and offset), the quantiles' location, Q - 1 increments
        self.response_terms = RESPONSE_DAYS + forcing_channels * len(forcing_scales) + 1 if linear_response else 1
        self.outputs_per_lead = self.response_terms + self.config.quantile_location + max(quantiles, 1) - 1
        self.cells = nn.ModuleList(
            ConvLSTMCell(c_in, c_out, kernel_size)
            for c_in, c_out in zip([in_channels] + hidden[:-1], hidden))
        self.head = nn.Sequential(
            nn.Conv2d(hidden[-1] + forcing_channels * len(forcing_scales), hidden[-1], head_kernel,
                      padding=head_kernel // 2), nn.GELU(),
            nn.Conv2d(hidden[-1], leads * self.outputs_per_lead, kernel_size=1))
        if predict_delta:  # no change yet: the untrained model is persistence
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)
        if quantiles:  # per lead, factors on the quantiles' spread and on its lower side, set after training
            self.register_buffer("spread_scale", torch.ones(leads))
            self.register_buffer("lower_spread", torch.ones(leads))
            # per lead, 1 where a located model's quantiles are moved to the centre's mean, set after training
            self.register_buffer("mean_at_centre", torch.zeros(leads))
        self._bounded = True  # evaluated forecasts stop at ceiling() (see unbounded())
        self.set_level_calibration(level_calibration)

    @classmethod
    def from_config(cls, config: dict) -> "ConvLSTMForecaster":
        cfg = ModelConfig(**config)
        return cls(cfg.in_channels, cfg.hidden_channels, cfg.kernel_size, leads=cfg.leads,
                   predict_delta=cfg.predict_delta, head_kernel=cfg.head_kernel, forcing_channels=cfg.forcing_channels,
                   forcing_scales=cfg.forcing_scales, quantiles=cfg.quantiles,
                   linear_response=cfg.linear_response, stats=cfg.stats, quantile_location=cfg.quantile_location,
                   level_calibration=cfg.level_calibration)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        # a probabilistic checkpoint written before lower_spread existed (2026-12-07) holds its
        # quantiles as trained below the centre: factor 1 (BatchNorm fills a key added later so)
        if self.config.quantiles:
            state_dict.setdefault(prefix + "lower_spread", torch.ones_like(self.lower_spread))
            # and before mean_at_centre (2026-12-07, forty-ninth session), at their own location
            state_dict.setdefault(prefix + "mean_at_centre", torch.zeros_like(self.mean_at_centre))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def set_level_calibration(self, calibration: Sequence[dict]) -> None:
        """Per lead, ``{"centres": [K], "levels": [K][Q]}``: a pixel whose median (normalised,
        the mean of the two middle quantiles) lies at a class centre has its quantiles read
        at that class's Q increasing levels in (0, 1) (linear between its own quantiles, and
        beyond the outer two), between centres at levels interpolated linearly. Empty: none.
        The calibration goes into :attr:`config`, so checkpoints carry it."""
        calibration = [{"centres": [float(c) for c in lead["centres"]],
                        "levels": [[float(v) for v in row] for row in lead["levels"]]} for lead in calibration]
        q = self.config.quantiles
        if calibration and (not q or len(calibration) != self.config.leads or any(
                not lead["centres"] or len(lead["levels"]) != len(lead["centres"])
                or any(len(row) != q for row in lead["levels"]) for lead in calibration)):
            raise ValueError(f"a level calibration needs, per lead ({self.config.leads}), K class centres and "
                             f"K rows of {q} levels")
        self.config.level_calibration = calibration
        if not calibration:
            self.register_buffer("level_centres", None, persistent=False)
            self.register_buffer("level_rows", None, persistent=False)
            return
        classes = max(len(lead["centres"]) for lead in calibration) + 1  # at least two: one to interpolate to
        centres, levels = [], []
        for lead in calibration:  # padded to one size: repeated last classes further up
            extra = classes - len(lead["centres"])
            top = lead["centres"][-1]
            centres.append(lead["centres"] + [top + 1.0 + k for k in range(extra)])
            levels.append(lead["levels"] + [lead["levels"][-1]] * extra)
        device = self.head[-1].weight.device
        self.register_buffer("level_centres", torch.tensor(centres, device=device), persistent=False)
        self.register_buffer("level_rows", torch.tensor(levels, device=device), persistent=False)

    def receptive_radius(self, input_days: int) -> int:
        """How far (pixels) an output pixel sees: every step of every layer widens the
        view by ``kernel_size // 2``, and the head by ``head_kernel // 2``."""
        recurrence = input_days * len(self.cells) * (self.config.kernel_size // 2)
        forcing = max(self.config.forcing_scales) // 2 if self.config.forcing_channels else 0
        return max(recurrence, forcing) + self.config.head_kernel // 2

    def forward(self, x: torch.Tensor, forcings: torch.Tensor | None = None, with_centre: bool = False
                ) -> torch.Tensor:
        """``x`` (B, T, C, H, W) past days; ``forcings`` (B, D, F, H, W) with D x F =
        ``forcing_channels``, or None when the model has none. Returns (B, L, 1, H, W), or
        (B, L, Q, H, W) for a probabilistic model; ``with_centre`` puts a probabilistic
        model's centre before its quantiles, (B, L, 1 + Q, H, W), for its training loss."""
        if x.dim() != 5:
            raise ValueError(f"expected input (batch, time, channels, height, width), got {tuple(x.shape)}")
        expected = self.config.forcing_channels
        given = 0 if forcings is None else forcings.shape[1] * forcings.shape[2]
        if given != expected:
            raise ValueError(f"the model takes {expected} forcing channels, got {given}")
        states: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.cells)
        for t in range(x.shape[1]):
            layer_input = x[:, t]
            for k, cell in enumerate(self.cells):
                states[k] = cell(layer_input, states[k])
                layer_input = states[k][0]
        if not expected:
            forcings = None  # an empty tensor from a sampler without forcings
        if forcings is not None:
            flat = forcings.flatten(1, 2).to(layer_input.dtype)
            layer_input = torch.cat([layer_input] + [box_mean(flat, k) for k in self.config.forcing_scales], dim=1)
        out = self.head(layer_input)
        b, _, h, w = out.shape
        out = out.view(b, self.config.leads, self.outputs_per_lead, h, w)
        if self.config.linear_response:
            centre = self._linear_response(out, x, forcings)
            out = torch.cat([centre, out[:, :, self.response_terms:]], dim=2)
        elif self.config.predict_delta:
            out = torch.cat([out[:, :, :1] + x[:, -1, :1].unsqueeze(1), out[:, :, 1:]], dim=2)
        if not self.config.quantiles:
            return self._below_ceiling(out)
        # Q - 1 increments: quantiles that never cross, spread around their location: the
        # centre, or with quantile_location an offset from it (the centre trained apart)
        centre, location, increments = out[:, :, :1], out[:, :, :1], out[:, :, 1:]
        if self.config.quantile_location:
            location, increments = centre.detach() + out[:, :, 1:2], out[:, :, 2:]
        steps = torch.nn.functional.softplus(increments - _SPACING_OFFSET)
        offsets = torch.cat([torch.zeros_like(centre), steps.cumsum(dim=2)], dim=2)
        spread = self.spread_scale.to(out.dtype).view(1, -1, 1, 1, 1)
        quantiles = location + spread * widen_below(offsets - offsets.mean(dim=2, keepdim=True), self.lower_spread)
        if self.config.level_calibration:
            quantiles = self._at_calibrated_levels(quantiles.float()).to(out.dtype)
        if self.config.quantile_location and bool(self.mean_at_centre.any()):
            moved = moved_to_centre(quantiles, centre, self.config.stats[0]).to(out.dtype)
            quantiles = torch.where(self.mean_at_centre.bool().view(1, -1, 1, 1, 1), moved, quantiles)
        return self._below_ceiling(torch.cat([centre, quantiles], dim=2) if with_centre else quantiles)

    def ceiling(self) -> float | None:
        """The largest forecast (normalised): :data:`CEILING_FACTOR` times the training days'
        largest target value (``stats[0]["max"]``); None for a model whose stats lack it."""
        target = self.config.stats[0] if self.config.stats else {}
        if "max" not in target:
            return None
        return (math.log1p(CEILING_FACTOR * target["max"]) - target["mean"]) / target["std"]

    @contextmanager
    def unbounded(self) -> Iterator["ConvLSTMForecaster"]:
        """Evaluated forecasts without :meth:`ceiling` inside the block: for a calibration
        that rescales the quantiles itself and must bound them after rescaling, as
        :meth:`forward` bounds the rescaled ones."""
        self._bounded = False
        try:
            yield self
        finally:
            self._bounded = True

    def clamp_to_ceiling(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (normalised) bounded at :meth:`ceiling`; unchanged for a model without one."""
        ceiling = self.ceiling()
        return out if ceiling is None else out.clamp(max=ceiling)

    def _below_ceiling(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` bounded at :meth:`ceiling` when evaluating. Training leaves it unbounded, so
        that the loss keeps pulling a too-high value down (a clamped one has no gradient)."""
        return out if self.training or not self._bounded else self.clamp_to_ceiling(out)

    def _at_calibrated_levels(self, quantiles: torch.Tensor) -> torch.Tensor:
        """The quantiles (B, L, Q, H, W) read at the levels of :meth:`set_level_calibration`."""
        b, leads, q, h, w = quantiles.shape
        median = quantiles_median(quantiles)  # (B, L, H, W)
        z = median.transpose(0, 1).reshape(leads, -1).contiguous()  # (L, N)
        centres = self.level_centres
        upper = torch.searchsorted(centres, z).clamp(1, centres.shape[1] - 1)
        low, high = centres.gather(1, upper - 1), centres.gather(1, upper)
        weight = ((z - low) / (high - low)).clamp(0, 1).unsqueeze(-1)  # (L, N, 1)
        below_rows, above_rows = (self.level_rows.gather(1, k.unsqueeze(-1).expand(-1, -1, q))  # (L, N, Q)
                                  for k in (upper - 1, upper))
        levels = below_rows * (1 - weight) + above_rows * weight
        position = levels.view(leads, b, h, w, q).permute(1, 0, 4, 2, 3) * q - 0.5  # (B, L, Q, H, W)
        below = position.floor().clamp(0, q - 2).long()
        low_q, high_q = quantiles.gather(2, below), quantiles.gather(2, below + 1)
        return low_q + (position - below) * (high_q - low_q)

    def _linear_response(self, out: torch.Tensor, x: torch.Tensor, forcings: torch.Tensor | None) -> torch.Tensor:
        """The forecast (B, L, 1, H, W) in normalised space from the gains and offset in
        ``out[:, :, :response_terms]``: the last days of the target and the forcing features,
        each in physical units over its training rms, weighted per pixel and lead."""
        target, *forcing_stats = self.config.stats
        recent = x[:, -RESPONSE_DAYS:, 0]
        if recent.shape[1] < RESPONSE_DAYS:  # fewer input days: the first stands in for the days before it
            recent = torch.cat([recent[:, :1]] * (RESPONSE_DAYS - recent.shape[1]) + [recent], dim=1)
        past = to_physical(recent.float(), target) / target["rms"]  # (B, K, H, W)
        features = [past.flip(1)]  # today first
        if forcings is not None:
            b, days, variables, h, w = forcings.shape
            physical = torch.stack([to_physical(forcings[:, :, v].float(), s) / s["rms"]
                                    for v, s in enumerate(forcing_stats)], dim=2).view(b, days * variables, h, w)
            features += [box_mean(physical, k) for k in self.config.forcing_scales]
        features.append(torch.ones_like(past[:, :1]))
        features = torch.cat(features, dim=1).unsqueeze(1)  # (B, 1, terms, H, W)
        gains = out[:, :, :self.response_terms].float()
        change = (gains * features).sum(dim=2, keepdim=True)  # (B, L, 1, H, W), over the target's rms
        today = past[:, -1:].unsqueeze(1) * target["rms"]
        # the change of the log value, added to today's: no change is exactly persistence
        logged = signed_log1p(today + change * target["rms"]) - signed_log1p(today)
        return (x[:, -1:, :1].float() + logged / target["std"]).to(out.dtype)


TILE = 512  # largest side (pixels) of the map pieces a forecast, validation or calibration runs on
# window pixels one forward pass of a forecast, validation or calibration takes at most: on a
# CPU about 1 GB of activations for the default model with rain (~1.9 KB per pixel), and as
# fast per issue day as larger passes (docs/scaling.md)
PASS_PIXELS = 2**19


class MapTile(NamedTuple):
    """One piece of a map: the ``region`` (rows, columns) the model reads, the ``core`` it
    gives (in map pixels) and that core's place ``inside`` the region."""

    region: tuple[slice, slice]
    core: tuple[slice, slice]
    inside: tuple[slice, slice]


def _spans(size: int, tile: int, margin: int) -> list[tuple[slice, slice, slice]]:
    if size <= tile:
        return [(slice(0, size), slice(0, size), slice(0, size))]
    if tile <= 2 * margin:
        raise ValueError(f"tile {tile} must exceed twice the margin {margin}")
    pieces = -(-size // (tile - 2 * margin))
    step, spans = -(-size // pieces), []  # cores of even size: no sliver at the end
    for start in range(0, size, step):
        stop = min(start + step, size)
        low, high = max(start - margin, 0), min(stop + margin, size)
        spans.append((slice(low, high), slice(start, stop), slice(start - low, stop - low)))
    return spans


def map_tiles(height: int, width: int, tile: int, margin: int) -> list[MapTile]:
    """Pieces of a ``height`` x ``width`` map, each at most ``tile`` a side, for a model whose
    output pixels see ``margin`` pixels around them (its
    :meth:`~ConvLSTMForecaster.receptive_radius`). Each core lies ``margin`` pixels from
    every cut edge of its region, so the model gives it as it would from the whole map;
    the cores partition the map. A map within ``tile`` is one piece, the whole map.

    >>> [(t.region[0], t.core[0], t.inside[0]) for t in map_tiles(10, 4, 6, 1)][1]
    (slice(3, 9, None), slice(4, 8, None), slice(1, 5, None))
    >>> len(map_tiles(10, 4, 6, 1)), len(map_tiles(6, 6, 6, 1))
    (3, 1)
    """
    return [MapTile((rows, cols), (core_rows, core_cols), (in_rows, in_cols))
            for rows, core_rows, in_rows in _spans(height, tile, margin)
            for cols, core_cols, in_cols in _spans(width, tile, margin)]


def window_passes(windows: int, piece: MapTile) -> list[slice]:
    """Slices of a batch of ``windows`` that each take at most :data:`PASS_PIXELS` pixels of
    ``piece``'s region through the model (at least one window).

    >>> [(s.start, s.stop) for s in window_passes(5, map_tiles(512, 512, 512, 0)[0])]  # 2 of 262,144 px
    [(0, 2), (2, 4), (4, 5)]
    >>> window_passes(8, map_tiles(128, 160, 512, 8)[0])
    [slice(0, 8, None)]
    """
    rows, cols = piece.region
    per_pass = max(1, PASS_PIXELS // ((rows.stop - rows.start) * (cols.stop - cols.start)))
    return [slice(start, min(start + per_pass, windows)) for start in range(0, windows, per_pass)]


def map_passes(windows: int, height: int, width: int, tile: int, margin: int) -> list[tuple[slice, MapTile]]:
    """Every pass a batch of ``windows`` whole maps takes through the model: the windows
    (:func:`window_passes`) and the piece of the map (:func:`map_tiles`) of each, piece by piece.

    >>> [(s.start, s.stop, piece.core) for s, piece in map_passes(2, 6, 10, 6, 1)][:2]
    [(0, 2, (slice(0, 6, None), slice(0, 4, None))), (0, 2, (slice(0, 6, None), slice(4, 8, None)))]
    """
    return [(passed, piece) for piece in map_tiles(height, width, tile, margin)
            for passed in window_passes(windows, piece)]


def to_physical(values: torch.Tensor, stats: dict[str, float]) -> torch.Tensor:
    """Normalised space -> physical units: ``expm1(values * std + mean)``, not clipped at 0
    (a forecast below 0 keeps a gradient towards the truth; inference clips)."""
    return torch.expm1((values.float() * stats["std"] + stats["mean"]).clamp(max=20.0))


def moved_to_centre(quantiles: torch.Tensor, centre: torch.Tensor, stats: dict[str, float]) -> torch.Tensor:
    """Quantiles (B, L, Q, H, W), normalised, moved by one step per pixel in the log space
    so that their mean in data units (clipped at 0, as forecasts are) is the ``centre``'s
    value (B, L, 1, H, W): a located model's quantiles placed on its MSE-trained centre.

    A located model's quantiles sit where the pinball loss put them, and narrowing them in the
    log space (the spread's calibration) lowers their mean in data units. On the largest
    river flows at lead 1 that put them about 1% below the centre and the truth, and the
    truth exceeded the p99 more often than forecast (docs/skill.md, "Where the largest
    flows' quantiles sit").

    >>> stats = {"mean": 0.0, "std": 1.0}
    >>> q = torch.log1p(torch.tensor([8.0, 10.0, 12.0])).view(1, 1, 3, 1, 1)
    >>> moved = moved_to_centre(q, torch.log1p(torch.tensor(21.0)).view(1, 1, 1, 1, 1), stats)
    >>> round(float(torch.expm1(moved).mean()), 3)
    21.0
    """
    def logged_mean(values: torch.Tensor) -> torch.Tensor:
        return torch.log1p(to_physical(values, stats).clamp(min=0).mean(dim=2, keepdim=True))

    return quantiles.float() + (logged_mean(centre) - logged_mean(quantiles)) / stats["std"]


def signed_log1p(values: torch.Tensor) -> torch.Tensor:
    """``log1p`` for values >= 0 and the identity below: the inverse of :func:`to_physical`'s
    ``expm1`` down to 0, with slope 1 on both sides, so a negative forecast keeps its gradient."""
    return torch.where(values >= 0, torch.log1p(values.clamp(min=0)), values)
