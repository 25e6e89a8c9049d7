"""The error of a rain forecast, put on the forcings that a model reads (``--forcing_error``).

In a hindcast the cube's observed rain stands in for the forecast of the lead days, and a
model trained on it trusts the rain it is given; forecasting with a real rain forecast, it
turns the forecast's errors into floods (docs/skill.md, "Forecast rain instead of the
observed rain"). ``runoff train --forcing_error SIGMA`` multiplies each training window's
forcings by :func:`forecast_error`, so that the model learns how far the rain can be
trusted, and calibrates a probabilistic model's spread on validation windows whose forcings
carry the same error, so that its spread is that of a forecast made with forecast rain.
That error varies over a few pixels, and over a basin it averages out; a real forecast also
misjudges a storm's total, by a factor the whole map shares. ``--forcing_error_area SIGMA``
adds that part: one log-normal factor per map (docs/skill.md, "A forecast whose error covers
the whole basin"). :func:`window_errors` gives that function for a run, each window's error
drawn by seed, epoch and issue day.

Example
-------
>>> record = {"forcings": ["rainf"], "norm_stats": {"rainf": {"mean": 0.0, "std": 1.0}},
...           "grid": {"height": 24, "width": 48}, "train_config": {"seed": 0}}
>>> with_error = window_errors(record, 0.5, epoch=1)
>>> rain, issues = torch.full((2, 1, 1, 24, 48), 0.5), torch.tensor([40, 41])
>>> noisy = with_error(rain, issues)
>>> noisy.shape, noisy[1:].equal(with_error(rain[1:], issues[1:]))
(torch.Size([2, 1, 1, 24, 48]), True)
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from .errors import RunoffError
from .model import to_physical

MAX_FORCING_ERROR = 2.0  # the largest log std --forcing_error takes (a factor of 7.4 either way)
# (forcings, issue days) -> the forcings times a forecast's error: what window_errors gives
ForcingError = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_forcing_errors(sigmas: Mapping[str, float], has_forcings: bool, nothing_to_perturb: str) -> None:
    """One clear error for a log std of ``sigmas`` (``{"--forcing_error": 0.5, ...}``) outside
    [0, :data:`MAX_FORCING_ERROR`], or one set where there are no forcings to put it on
    (``nothing_to_perturb`` says so, after the option and its value): the checks of ``runoff
    train`` and ``runoff calibrate``.

    >>> check_forcing_errors({"--forcing_error": 0.5, "--forcing_error_area": 0.0}, True, "")
    >>> check_forcing_errors({"--forcing_error_area": 3.0}, True, "")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    pipeline.errors.RunoffError: --forcing_error_area 3: must be in [0, 2]: a log std of ...
    """
    for option, sigma in sigmas.items():
        if not 0 <= sigma <= MAX_FORCING_ERROR:
            raise RunoffError(f"{option} {sigma:g}: must be in [0, {MAX_FORCING_ERROR:g}]: a log std of the "
                              "forcings' forecast error (0.5: a factor of about 1.6 either way; 0: none)")
        if sigma and not has_forcings:
            raise RunoffError(f"{option} {sigma:g}: {nothing_to_perturb}")


def forecast_error(forcings: torch.Tensor, stats: Sequence[dict[str, float]], sigma: float, smoothing: float,
                   generator: torch.Generator, area_sigma: float = 0.0) -> torch.Tensor:
    """The forcings (B, D, F, h, w), normalised as the model reads them (``stats``: each
    variable's), each map multiplied by a log-normal error of mean 1: a field of log std
    ``sigma``, smooth over ``smoothing`` pixels (a Gaussian's sigma), as ``runoff synth``
    gives ``rainf_fc``, times one factor over the whole map of log std ``area_sigma``. Trained
    on such maps, a model given the observed rain learns not to take the rain of a forecast
    at its word (docs/skill.md). The noise is drawn on the CPU from ``generator``, so the same
    generator draws it alike on any device; the field first, so that without ``area_sigma``
    the draws are those of the field alone.

    >>> rain = torch.full((2, 1, 1, 8, 8), 0.5)
    >>> noisy = forecast_error(rain, [{"mean": 0.0, "std": 1.0}], 0.5, 1.0, torch.Generator().manual_seed(0))
    >>> noisy.shape, bool((noisy != rain).all()), forecast_error(rain, [{"mean": 0.0, "std": 1.0}], 0.0, 1.0,
    ...                                                          torch.Generator()).equal(rain)
    (torch.Size([2, 1, 1, 8, 8]), True, True)
    """
    if not sigma and not area_sigma:
        return forcings
    b, d, f, h, w = forcings.shape
    noise = smooth_noise(b * d * f, h, w, smoothing, generator, std=sigma) if sigma else torch.zeros(b * d * f, h, w)
    if area_sigma:
        noise = noise + area_sigma * torch.randn((b * d * f, 1, 1), generator=generator)
    noise = noise.to(forcings.device).view(b, d, f, h, w)
    variance = sigma ** 2 + area_sigma ** 2
    out = torch.empty_like(forcings)
    for k, st in enumerate(stats):
        physical = to_physical(forcings[:, :, k], st).clamp(min=0) * torch.exp(noise[:, :, k] - variance / 2)
        out[:, :, k] = ((torch.log1p(physical) - st["mean"]) / st["std"]).to(out.dtype)
    return out


def smooth_noise(count: int, height: int, width: int, smoothing: float, generator: torch.Generator,
                 std: float = 1.0) -> torch.Tensor:
    """``count`` maps of ``height`` x ``width`` of Gaussian noise of std ``std``, smooth over
    ``smoothing`` pixels (a Gaussian's sigma), drawn on the CPU from ``generator``: white noise
    on a margin of the kernel's width beyond the maps, convolved, so each pixel is a weighted
    sum of independent draws, whose std is sum(k^2) for this separable kernel, however small the
    maps. Where the smoothing spans 4 pixels or more (a grid of 96 pixels or more, see
    :func:`error_smoothing`), the noise is drawn on a grid ``smoothing // 2`` times coarser and
    interpolated bilinearly: as smooth and as spread, at a cost that no longer grows with the
    smoothing's square (a 64-pixel patch of a 1,200 x 1,600 grid drew and convolved 464 x 464
    pixels; docs/scaling.md). Below 4 pixels the draws are those of full resolution.

    >>> noise = smooth_noise(400, 16, 16, 20.0, torch.Generator().manual_seed(0))
    >>> noise.shape, round(noise.std().item(), 1), round(noise[:, 0, 0].std().item(), 1)
    (torch.Size([400, 16, 16]), 1.0, 1.0)
    """
    step = max(1, int(smoothing // 2))
    smoothing /= step
    rows, cols = -(-(height - 1) // step) + 1, -(-(width - 1) // step) + 1  # coarse points spanning the maps
    radius = max(1, math.ceil(3 * smoothing))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-taps ** 2 / (2 * smoothing ** 2))
    kernel = kernel / kernel.sum()
    noise = torch.randn((count, 1, rows + 2 * radius, cols + 2 * radius), generator=generator)
    noise = torch.nn.functional.conv2d(torch.nn.functional.conv2d(noise, kernel.view(1, 1, 1, -1)),
                                       kernel.view(1, 1, -1, 1)) * (std / kernel.square().sum())
    if step > 1:
        noise = torch.nn.functional.interpolate(noise, size=((rows - 1) * step + 1, (cols - 1) * step + 1),
                                                mode="bilinear", align_corners=True)
    return noise[:, 0, :height, :width]


def error_smoothing(height: int, width: int) -> float:
    """The error's smoothing on a ``height`` x ``width`` grid, in pixels (a Gaussian's
    sigma): max(height, width) / 24, as ``runoff synth`` smooths ``rainf_fc``'s.

    >>> error_smoothing(48, 64)
    2.6666666666666665
    """
    return max(height, width) / 24


def window_errors(record: dict, sigma: float, epoch: int = 0, area_sigma: float = 0.0) -> ForcingError | None:
    """A function of a batch's forcings and issue days that gives the forcings times
    :func:`forecast_error` of log std ``sigma`` (and ``area_sigma`` over each whole map),
    for the run of ``record`` (a checkpoint's
    state, or a training run's record: its ``forcings``, their ``norm_stats``, the ``grid``
    the error is smooth on, and the ``train_config``'s ``seed``). Each window's error is
    drawn from a generator of its own, seeded by that seed, ``epoch`` and its issue day, so
    the same window draws the same error however the windows are batched or shared among
    ranks: a resumed epoch draws its errors again, and ``runoff calibrate --split val``
    (epoch 0) those of the calibration ``runoff train`` ended with. ``None`` where there is
    no error to draw (both log stds 0, or no forcings)."""
    if not (sigma or area_sigma) or not record.get("forcings"):
        return None
    stats = [record["norm_stats"][name] for name in record["forcings"]]
    smoothing = error_smoothing(record["grid"]["height"], record["grid"]["width"])
    seed = int(record.get("train_config", {}).get("seed", 0))

    def with_error(forcings: torch.Tensor, issues: torch.Tensor) -> torch.Tensor:
        return torch.cat([forecast_error(forcings[k:k + 1], stats, sigma, smoothing, torch.Generator().manual_seed(
            ((seed * 1_000_003 + epoch) * 1_000_033 + issue) % 2**63), area_sigma)
            for k, issue in enumerate(issues.tolist())])

    return with_error
