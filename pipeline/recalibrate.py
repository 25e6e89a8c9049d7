"""`runoff calibrate`: calibrate a trained probabilistic checkpoint again, on a period of
the user's choice, without training it again.

``runoff train --probabilistic`` calibrates ``best.pth``'s spread (and with
``--calibrate_levels`` its levels) on the validation split. One validation year sets one
spread, and on an eight-year record that spread was too wide for the wet years and too
narrow for the dry ones; calibrated on three years instead, spread/skill came into range
(docs/skill.md, "Seven test years instead of one"). This command reads the checkpoint,
calibrates the quantiles as trained (their lower side as training widened it, kept) on the
windows whose targets lie in ``--split`` (by
the rule and with the levels the checkpoint was trained with, unless told otherwise), chooses
its single map again on those windows (the mean or the median of the quantiles), and
writes a new checkpoint beside it; the weights are unchanged, and ``predict`` and
``evaluate`` read the new file as they read ``best.pth``. A checkpoint trained with
``--forcing_error`` is calibrated with its forcings times that error, as in training, unless
told ``forcing_error=0`` (a cube whose forcings already hold forecasts).

>>> recalibrate("checkpoints/best.pth", "stores/qs.zarr", "2025-01-01..2027-12-31",
...             "checkpoints/best_2025_2027.pth")                    # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from .baselines import wet_thresholds
from .calibration import CALIBRATION_PIXELS, CALIBRATIONS, calibrate_model
from .checkpoint import read_checkpoint, save_checkpoint, with_calibration
from .cube import TARGET, Split
from .device import pick_device
from .errors import RunoffError, RunoffWarning
from .forcing_error import check_forcing_errors, window_errors
from .inference import split_windows
from .sampler import WindowSampler, collate_windows, data_loader
from .storage import location


@dataclass
class Recalibration:
    """What :func:`recalibrate` did: the checkpoint it wrote, the days it calibrated on, the
    spread factor, the single map and (a located model) whether the quantiles moved to the
    centre's mean, per lead, and the forecast error the forcings were given (its log std, and
    that of its factor over each whole map)."""

    path: Path
    period: Split
    windows: int
    spread: dict[int, float]
    point_maps: dict[int, str]
    levels: bool
    forcing_error: float
    forcing_error_area: float = 0.0
    moved: dict[int, float] | None = None  # mean_at_centre where it was chosen (--calibrate_location), else None


def recalibrate(weights_path: str | Path, data_dir: str | Path, split: str, output_path: str | Path,
                rule: str | None = None, levels: bool | None = None, place: bool | None = None,
                device: str = "auto", batch_size: int = 8,
                storage_options: dict | None = None, max_pixels: int | None = CALIBRATION_PIXELS,
                forcing_error: float | None = None, forcing_error_area: float | None = None) -> Recalibration:
    """Calibrate the probabilistic checkpoint ``weights_path`` on the windows of ``data_dir``
    whose targets lie in ``split`` (a split of the checkpoint, or a period START..END) and
    write it to ``output_path``, which must not exist. ``rule``, ``levels``, ``place`` (where
    a located model's quantiles sit), ``forcing_error`` and ``forcing_error_area`` default to
    the checkpoint's own (``--calibration``, ``--calibrate_levels``, ``--calibrate_location``,
    ``--forcing_error``, ``--forcing_error_area`` of its training). The spread
    of maps larger than ``max_pixels`` is scored on a lattice of that many pixels (``None``:
    every pixel)."""
    ckpt = read_checkpoint(weights_path, storage_options=storage_options)
    if not ckpt.quantiles:
        raise RunoffError(f"--weights_path {weights_path}: a deterministic checkpoint; only a probabilistic one "
                          "(runoff train --probabilistic) has a spread to calibrate")
    trained_with = ckpt.state.get("train_config", {})
    rule = rule or trained_with.get("calibration", CALIBRATIONS[0])
    if rule not in CALIBRATIONS:
        raise RunoffError(f"--calibration {rule}: choose {' or '.join(CALIBRATIONS)}")
    levels = bool(trained_with.get("calibrate_levels", False)) if levels is None else levels
    located = bool(ckpt.state["model_config"].get("quantile_location"))
    place = bool(trained_with.get("calibrate_location", False)) if place is None else place
    if place and not located:
        raise RunoffError(f"--calibrate_location: {weights_path} was trained with --no-quantile_location; only a "
                          "located model's quantiles can move onto its centre")
    errors = {name: float(trained_with.get(name, 0.0)) if given is None else given
              for name, given in (("forcing_error", forcing_error), ("forcing_error_area", forcing_error_area))}
    check_forcing_errors({f"--{name}": sigma for name, sigma in errors.items()}, bool(ckpt.forcings),
                         f"{weights_path} reads no forcings to put an error on")
    forcing_error, forcing_error_area = errors["forcing_error"], errors["forcing_error_area"]
    output = location(output_path, storage_options)
    if output.exists():
        raise RunoffError(f"--output_path {output_path}: exists; name a new file (nothing is overwritten)")
    windows = split_windows(ckpt, data_dir, split, weights_path, storage_options)
    period, issues = windows.period, windows.issues
    train = ckpt.splits["train"]
    if period.overlaps(train):
        warnings.warn(f"--split {split}: overlaps the training split ({train.start}..{train.end}); a spread "
                      "calibrated on days the model was fitted to comes out too narrow", RunoffWarning, stacklevel=2)
    thresholds = tuple(wet_thresholds(windows.ds, train.start, train.end)) if rule == "brier" or place else ()
    torch_device = pick_device(device)
    model = ckpt.build_model().to(torch_device)
    sampler = WindowSampler(windows.store, issues, windows.spec, ckpt.norm_stats, patch=None, shuffle=False,
                            storage_options=storage_options, maps=ckpt.maps)
    with data_loader(sampler, batch_size=batch_size, collate_fn=collate_windows) as loader:
        point_maps = calibrate_model(model, loader, torch_device, ckpt.norm_stats[TARGET], rule=rule,
                                     thresholds=thresholds, levels=levels, location=place, max_pixels=max_pixels,
                                     forcing_error=window_errors(ckpt.state, forcing_error,
                                                                 area_sigma=forcing_error_area))
    save_checkpoint(with_calibration(ckpt.state, model, [period.start.isoformat(), period.end.isoformat()],
                                     forcing_error, forcing_error_area, point_maps), output)
    return Recalibration(output, period, int(issues.size),
                         dict(zip(ckpt.leads, model.spread_scale.tolist())), dict(zip(ckpt.leads, point_maps)), levels,
                         forcing_error, forcing_error_area,
                         dict(zip(ckpt.leads, model.mean_at_centre.tolist())) if place else None)
