"""The ``runoff`` command line: ``runoff ingest|info|synth ...``.

Every option is spelled with underscores (``--data_dir``) and with hyphens
(``--data-dir``). Errors a user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import RunoffError, RunoffWarning, first_line

# calibration.CALIBRATIONS, spelt here so that parsing options does not load torch
CALIBRATION_RULES = ("spread_skill", "brier")


def _option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--name_with_underscores`` and its ``--hyphenated-twin``."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*spellings, dest=name, **kwargs)


def _scheduler_option(parser: argparse.ArgumentParser) -> None:
    _option(parser, "scheduler", help="run the chunked work on dask.distributed: local:N (N worker processes) "
            "or a scheduler address tcp://host:8786 (default: this machine, no cluster)")


def _read_options(args: argparse.Namespace):
    from .rasters import ReadOptions

    return ReadOptions(band=args.band, png_scale=args.png_scale, crs=args.crs, like=args.like, nodata=args.nodata)


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunoffError(f"--storage_options: not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise RunoffError("--storage_options: expected a JSON object such as '{\"anon\": true}'")
    return value


def _start_date(text: str | None):
    import datetime as dt

    if text is None:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise RunoffError(f"--start {text!r}: expected a date YYYY-MM-DD") from None


def cmd_ingest(args: argparse.Namespace) -> None:
    from .cluster import dask_client
    from .cube import describe_cube
    from .ingest import ingest, parse_chunks

    from .netcdf import NetcdfOptions, parse_variables

    chunks, storage_options = parse_chunks(args.chunks), _storage_options(args.storage_options)
    if args.static is not None:
        _ingest_static(args, storage_options)
        return
    netcdf = NetcdfOptions(variables=parse_variables(args.variable), aggregate=args.aggregate,
                           day_start=args.day_start, stamp=args.stamp, units=args.units, crs=args.crs,
                           nodata=args.nodata)
    with dask_client(args.scheduler) as client:
        report = ingest(args.input_dir, args.store, date_format=args.date_format, options=_read_options(args),
                        chunks=chunks, overwrite=args.overwrite, units=args.units,
                        long_name=args.long_name, progress=sys.stderr.isatty(),
                        storage_options=storage_options, client=client, resample=args.resample, netcdf=netcdf,
                        start=_start_date(args.start))
    print(f"{report.store}: wrote {report.written} daily map(s), {report.skipped} already present; "
          f"{report.start} .. {report.end}, {len(report.missing_dates)} missing"
          + "".join(f" ({name} {len(days)} missing)" for name, days in report.missing_inputs.items())
          + f"; variables {', '.join(report.variables)}"
          + (f"; static maps {', '.join(report.static)}" if report.static else ""))
    if args.info:
        print(describe_cube(args.store, _storage_options(args.storage_options)))


def _ingest_static(args: argparse.Namespace, storage_options: dict | None) -> None:
    from .cube import describe_cube
    from .ingest import ingest_static

    daily = [f"--{name}" for name in ("date_format", "start", "chunks", "variable", "aggregate", "stamp")
             if getattr(args, name) not in (None, "auto")] + (["--day_start"] if args.day_start else [])
    if daily:
        raise RunoffError(f"{', '.join(daily)}: options of daily files; --static {args.static} reads one raster")
    wrote = ingest_static(args.input_dir, args.store, args.static, options=_read_options(args), resample=args.resample,
                          overwrite=args.overwrite, units=args.units, long_name=args.long_name,
                          storage_options=storage_options)
    print(f"{args.store}: {'wrote' if wrote else 'already holds'} the static map {args.static} from {args.input_dir}")
    if args.info:
        print(describe_cube(args.store, storage_options))


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoint import read_checkpoint
    from .cube import describe_cube
    from .storage import is_url, location

    storage_options = _storage_options(args.storage_options)
    where = location(args.store, storage_options)
    if where.is_file():  # a cube is a folder; a checkpoint one file
        try:
            ckpt = read_checkpoint(args.store, storage_options=storage_options)
        except RunoffError:
            raise RunoffError(f"{args.store}: a file, but neither a Zarr cube (a folder) nor a runoff "
                              f"checkpoint (.pth){_input_hint(where)}") from None
        print(ckpt.describe(args.store))
    elif (where / "best.pth").is_file():
        raise RunoffError(f"{args.store}: a folder of checkpoints, not a Zarr cube; describe one: "
                          f"runoff info {where / 'best.pth'}")
    elif not is_url(args.store) and where.is_dir() and not (where / "zarr.json").exists():
        raise RunoffError(f"{args.store}: a folder, but not a Zarr cube (no zarr.json){_input_hint(where)}")
    else:
        print(describe_cube(args.store, storage_options))


def _input_hint(path: Path) -> str:
    """For input data given to ``runoff info``: the ingest command that makes a cube of it."""
    from .ingest import default_store
    from .netcdf import is_netcdf
    from .rasters import RASTER_SUFFIXES

    if is_netcdf(path) or path.is_dir():
        source = path
    elif path.suffix.lower() in RASTER_SUFFIXES:
        source = path.parent  # one day of a folder of daily rasters
    else:
        return ""
    return f"; if it holds input data, make a cube of it: runoff ingest {source} {default_store(source)}"


def cmd_synth(args: argparse.Namespace) -> None:
    from .synth import write_series

    paths = write_series(args.out_dir, days=args.days, height=args.height, width=args.width, crs=args.crs,
                         seed=args.seed, start=args.start, fmt=args.format, covariates=name_list(args.covariates),
                         png_scale=args.png_scale, progress=sys.stderr.isatty(), regime=args.regime)
    print(f"{args.out_dir}: wrote {len(paths)} daily QS {args.format.upper()} file(s), "
          f"{paths[0].name} .. {paths[-1].name}")
    if args.format == "png":
        print(f"ingest them with: runoff ingest {args.out_dir} STORE --crs {args.crs} --png_scale {args.png_scale:g}")


def name_list(text: str | None) -> list[str]:
    """A comma-separated option's names, blanks dropped; none for None.

    >>> name_list("rainf, soilm,")
    ['rainf', 'soilm']
    """
    return [name.strip() for name in text.split(",") if name.strip()] if text else []


def _float_list(text: str | None, option: str, expected: str) -> list[float] | None:
    """``"5,20"`` -> [5.0, 20.0]; None stays None."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise RunoffError(f"{option} {text!r}: expected {expected}") from None


def int_list(text: str, option: str) -> list[int]:
    """An integer list option: ``"16"``, ``"16,32"`` or a range ``"1-6"``; a bad one is a
    :class:`RunoffError` naming ``option``.

    >>> int_list("1-3,6", "--leads")
    [1, 2, 3, 6]
    """
    values: list[int] = []
    try:
        for part in str(text).split(","):
            lo, sep, hi = part.strip().partition("-")
            values += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise RunoffError(f"{option} {text!r}: expected integers such as 16, 16,32 or 1-6") from None
    if not values:
        raise RunoffError(f"{option} {text!r}: expected at least one integer")
    return values


def train_config(args: argparse.Namespace):
    """TrainConfig from the options given; returns it and the names the user set."""
    from .train import TrainConfig

    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command", "lead")}
    if args.lead is not None and args.leads is not None:
        raise RunoffError("--lead and --leads: give one of them")
    if args.lead is not None:
        given["leads"] = [args.lead]
    elif args.leads is not None:
        given["leads"] = int_list(args.leads, "--leads")
    if "hidden_channels" in given:
        given["hidden_channels"] = int_list(given["hidden_channels"], "--hidden_channels")
    for name in ("covariates", "forcings"):
        if name in given:
            given[name] = name_list(given[name])
    if "storage_options" in given:
        given["storage_options"] = _storage_options(given["storage_options"])
    return TrainConfig(**given), set(given)


def cmd_train(args: argparse.Namespace) -> None:
    from .train import train

    config, explicit = train_config(args)
    result = train(config, explicit, progress=sys.stderr.isatty())
    print(f"trained {result.epochs_run} epoch(s); best epoch {result.best_epoch} "
          f"(validation loss {result.best_val_loss:.4f}): {result.best_checkpoint}")


def cmd_predict(args: argparse.Namespace) -> None:
    from .cluster import dask_client
    from .inference import parse_forcing_sources
    from .predict import predict

    storage_options = _storage_options(args.storage_options)
    with dask_client(args.scheduler):  # the cube's reads run on the cluster
        report = predict(args.weights_path, args.input_dir, args.output_dir, dates=args.dates, last=args.last,
                         split=args.split, fmt=args.format, tile=args.tile, plots_dir=args.plots_dir,
                         max_plots=args.max_plots, device=args.device, batch_size=args.batch_size,
                         quantiles=_float_list(args.quantiles, "--quantiles", "levels such as 0.1,0.5,0.9"),
                         exceedance=_float_list(args.exceedance, "--exceedance", "thresholds in data units, e.g. 5,20"),
                         members=args.members, storage_options=storage_options,
                         progress=sys.stderr.isatty(), forcings_from=parse_forcing_sources(args.forcings))
    print(f"{len(report.geotiffs)} forecast GeoTIFF(s) for {len(report.issues)} issue day(s) "
          f"({report.issues[0]} .. {report.issues[-1]}) in {args.output_dir}")
    if report.netcdf:
        print(f"NetCDF: {report.netcdf}")
    for path in report.figures:
        print(f"figure: {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .cluster import dask_client
    from .evaluate import evaluate
    from .inference import parse_forcing_sources

    thresholds = _float_list(args.thresholds, "--thresholds", "numbers in data units, e.g. 5,20")
    storage_options = _storage_options(args.storage_options)
    with dask_client(args.scheduler):  # the cube's reads and the climatology run on the cluster
        report = evaluate(args.weights_path, args.data_dir, split=args.split, output_dir=args.output_dir,
                          thresholds=thresholds, device=args.device, batch_size=args.batch_size,
                          storage_options=storage_options, progress=sys.stderr.isatty(),
                          forcings_from=parse_forcing_sources(args.forcings), mask=args.mask)
    print(report.summary)
    for path in report.files:
        print(f"wrote {path}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from .checkpoint import error_text, location_text, point_maps_text, spread_text
    from .recalibrate import recalibrate

    done = recalibrate(args.weights_path, args.data_dir, args.split, args.output_path, rule=args.calibration,
                       levels=args.calibrate_levels, place=args.calibrate_location, device=args.device,
                       batch_size=args.batch_size, storage_options=_storage_options(args.storage_options),
                       forcing_error=args.forcing_error, forcing_error_area=args.forcing_error_area)
    print(f"spread calibrated on {done.period.start}..{done.period.end} ({done.windows} window(s))"
          + error_text(done.forcing_error, done.forcing_error_area) + ": " + spread_text(done.spread)
          + ("; levels per flow class too" if done.levels else ""))
    if done.moved is not None:
        print(f"quantiles moved to the centre's mean: {location_text(done.moved)}")
    print(f"single map: {point_maps_text(done.point_maps)}")
    print(f"wrote {done.path}")


class _OneLineParser(argparse.ArgumentParser):
    """argparse without the usage dump on a bad option: one error line naming it, exit 2
    (``runoff COMMAND --help`` still shows the usage). Options are spelled out in full:
    an abbreviation such as ``--output`` would be "ambiguous" between the two spellings of
    one option (``--output_path``, ``--output-path``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog.split()[0]}: error: {message}\n")


def _forcings_from_option(p: argparse.ArgumentParser, doing: str) -> None:
    """``--forcings NAME=VARIABLE`` of predict and evaluate."""
    _option(p, "forcings", metavar="NAME=VARIABLE",
            help="read the checkpoint's forcing NAME on the lead days from the cube's VARIABLE, e.g. rainf=rainf_fc: "
                 f"a model trained on the observed rain {doing} with an archive of rain forecasts ingested beside it")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="runoff", description="Forecast gridded surface runoff (QS) "
                                     "from daily GeoTIFF/PNG maps with a ConvLSTM.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="daily rasters or NetCDF/HDF5 steps -> georeferenced Zarr cube "
                       "(create, append, resume)")
    p.add_argument("input_dir", help="folder of daily rasters or of NetCDF/HDF5 files (or one NetCDF file, or a "
                   "quoted glob), or a folder of one such sub-folder per variable (Qs/, Rainf/...); with --static, "
                   "one raster file")
    p.add_argument("store", help="Zarr cube to create or extend (path or fsspec URL)")
    _option(p, "date_format", help="strptime format of the date in file names, e.g. %%d.%%m.%%Y")
    _option(p, "start", help="date (YYYY-MM-DD) of step 1 of a PCRaster map stack (IW000000.001, ...)")
    _option(p, "band", type=int, help="band to read from multi-band files (1-based)")
    _option(p, "png_scale", type=float, help="physical value of the largest PNG code (value = code/max*scale)")
    _option(p, "crs", help="CRS for rasters without one, e.g. EPSG:4326 (PNG with a world file)")
    _option(p, "like", help="reference GeoTIFF giving CRS and transform to PNGs without a world file")
    _option(p, "nodata", type=float, help="the value that marks no data (e.g. -9999) in files that do not declare it "
            "(rasters: it replaces what they declare; NetCDF: besides _FillValue, in unpacked values)")
    _option(p, "chunks", help="chunk sizes, e.g. time=16,y=256,x=256")
    _option(p, "units", help="rasters: units of qs (default: the files' tags, else kg m-2); "
            "NetCDF: units to store, e.g. 'kg m-2' converts mm, m and kg m-2 s-1 to kg m-2 per day")
    _option(p, "variable", help="NetCDF: the runoff variable (Qs_acc), or cube=file names for several "
            "(qs=sum_runoff,rainf=Precipitation); default: the file's only (time, y, x) variable")
    _option(p, "aggregate", help="NetCDF: how sub-daily steps make a day, "
            "sum or mean (default from the units: amounts per step sum, rates and states average)")
    _option(p, "day_start", type=int, default=0, help="NetCDF: hour (UTC) at which a day begins (default 0)")
    _option(p, "stamp", default="auto",
            help="NetCDF: auto, start, middle or end: which end of its interval a step's time marks (auto: time_bnds, else the end for "
            "sub-daily steps and the day itself for daily ones)")
    _option(p, "static", metavar="NAME", help="write the one raster INPUT_DIR into the existing cube as the static "
            "map NAME: a (y, x) layer that holds on every day, such as a DEM's flow accumulation; train reads it "
            "with --covariates NAME")
    _option(p, "long_name", help="long_name of qs (with --static: of the static map)")
    _option(p, "overwrite", action="store_true", help="replace days whose values changed")
    _option(p, "resample", help="bilinear, average or nearest: resample covariates and forcings on another grid "
            "(e.g. a coarser rain forecast) onto the grid of qs; without it a file off the grid is an error")
    _option(p, "storage_options", help="JSON options for fsspec URLs, e.g. '{\"anon\": false}'")
    _option(p, "info", action="store_true", help="print the cube summary afterwards")
    _scheduler_option(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("info", help="summary of a cube (dims, dates, missing days, CRS, chunks, size, "
                       "statistics) or of a checkpoint (model, inputs, grid, days, training, spread)")
    p.add_argument("store", help="Zarr cube, or a checkpoint (.pth)")
    _option(p, "storage_options", help="JSON options for fsspec URLs")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train the ConvLSTM on a cube (or a raster folder, ingested first)")
    _option(p, "data_dir", help="Zarr cube, or folder of rasters ingested into stores/<name>.zarr "
            "(default stores/qs.zarr)")
    _option(p, "epochs", type=int, help="maximum number of epochs (default 50)")
    _option(p, "batch_size", type=int, help="windows per batch (default 8)")
    _option(p, "hidden_channels", help="hidden channels: 16, or one per layer: 16,32 (default 16)")
    _option(p, "kernel_size", type=int, help="odd convolution kernel size (default 3)")
    _option(p, "num_layers", type=int, help="ConvLSTM layers (default 1)")
    _option(p, "input_days", type=int, help="past days per window (default 6)")
    _option(p, "lead", type=int, help="forecast one lead time, in days (default 1)")
    _option(p, "leads", help="forecast several leads: 1-6 or 1,3,6")
    _option(p, "lr", type=float, help="AdamW learning rate (default 1e-3)")
    _option(p, "weight_decay", type=float, help="AdamW weight decay (default 1e-4)")
    _option(p, "patience", type=int, help="epochs without validation improvement before stopping (default 8)")
    _option(p, "ema_decay", type=float,
            help="forecasts use an exponential moving average of the weights, with this decay per optimiser step "
                 "(default 0.99; 0 for the last step's weights): steadier and more skilful (docs/skill.md)")
    _option(p, "seed", type=int, help="random seed (default 0)")
    _option(p, "device", help="auto, cpu, cuda or mps (default auto)")
    _option(p, "num_workers", type=int, help="DataLoader worker processes, kept across epochs (default 0; "
                                               "on a GPU 0 is faster: a background thread prepares the batches)")
    _option(p, "checkpoint_dir", help="where model_epoch{N}.pth and best.pth go (default checkpoints)")
    _option(p, "output_dir", help="where history.csv and plots/ go (default outputs)")
    _option(p, "resume", help="checkpoint to continue from")
    _option(p, "patch", type=int, help="training patch size in pixels (default 64)")
    _option(p, "train_end", help="last day of the training split, YYYY-MM-DD")
    _option(p, "val_end", help="last day of the validation split, YYYY-MM-DD")
    _option(p, "covariates", help="extra input variables of the cube on the past days, e.g. soilm, or a static "
            "map such as upstream_area")
    _option(p, "season", action="store_true", default=None,
            help="also where each past day lies in the year (the sine and cosine of its day of year), an input "
                 "computed from the dates: for runoff with a seasonal cycle, such as snowmelt (docs/skill.md)")
    _option(p, "climatology_map", action="store_true", default=None,
            help="also read each pixel's mean of log1p(qs) over the training days, a static map that the "
                 "checkpoint carries (where the rivers and wet slopes are; docs/skill.md)")
    _option(p, "forcings", help="cube variables known on the lead days (a rain forecast), e.g. rainf; in a hindcast "
            "the observed values stand in, a perfect forecast")
    _option(p, "forcing_error", type=float, metavar="SIGMA",
            help="train on the forcings times a smooth log-normal error of log std SIGMA (mean 1), the error of "
                 "a rain forecast's amounts (it does not mend storms a day off), so that a model trained on "
                 "observed rain holds up when forecasting with forecast rain: on CWatM, 0.5 kept the skill "
                 "against persistence with a forecast of that error at +0.53 .. +0.66 where a model trained without it fell to +0.17 .. +0.55, at a cost with the "
                 "observed rain; a probabilistic model's spread is calibrated with the same error "
                 "(docs/skill.md; default 0: none)")
    _option(p, "forcing_error_area", type=float, metavar="SIGMA",
            help="and times one log-normal factor per map of log std SIGMA (mean 1): a forecast that misjudges a "
                 "storm's total over the whole basin, which --forcing_error's field averages out over a basin "
                 "(docs/skill.md, 'A forecast whose error covers the whole basin'; default 0: none)")
    _option(p, "predict_delta", action=argparse.BooleanOptionalAction, default=None,
            help="forecast the change from the last input day, so that an untrained model is persistence "
                 "(default; --no-predict_delta to forecast the map itself)")
    _option(p, "linear_response", action=argparse.BooleanOptionalAction, default=None,
            help="form that change in physical units, linear in the last two days and the forcings, with gains "
                 "the network sets per pixel (default; --no-linear_response for a change in the log space)")
    _option(p, "probabilistic", action="store_true", default=None,
            help="forecast a distribution per pixel and lead (20 quantiles, trained by the pinball loss, i.e. "
                 "the CRPS); predict then writes quantile and exceedance maps, evaluate scores CRPS and Brier")
    _option(p, "quantile_location", action=argparse.BooleanOptionalAction, default=None,
            help="probabilistic: train the centre by the MSE, as a deterministic model, and place the quantiles "
                 "off it by a location of their own (default: medians within a few %% of the deterministic MSE, "
                 "closer reliability; --no-quantile_location centres the quantiles on a centre trained by the "
                 "pinball loss: a better CRPS, medians up to 1.3x the deterministic MSE; docs/skill.md)")
    _option(p, "calibration", choices=CALIBRATION_RULES,
            help="probabilistic: of the spread factors within 1%% of the best validation CRPS, take the one whose "
                 "spread/skill is nearest 1 (spread_skill, default) or whose Brier score at the wet p90 and p99 is "
                 "lowest (brier: more reliable exceedance maps)")
    _option(p, "calibrate_levels", action="store_true", default=None,
            help="probabilistic: after the spread, read each pixel's quantiles at the levels the validation truth "
                 "reached on pixels of a like median, per lead (for a validation split of a year or more: on an "
                 "eight-year river record it lowered the CRPS by 2-8%% and the widest reliability gap of the test "
                 "year, on two worlds, and over seven test years it widened the p99 gaps; after a dry validation "
                 "summer, and on the VIC sample, it did harm; docs/skill.md)")
    _option(p, "calibrate_location", action="store_true", default=None,
            help="probabilistic, located: after the spread, move the quantiles, per lead, so that their mean is the "
                 "MSE-trained centre's, where that lowers the Brier score at the wet p90 and p99, the CRPS and the "
                 "mean's error on the validation split (for a validation split of a year or more: on a 14-year "
                 "river record calibrated on three years it moved lead 1 and brought every lead's reliability gap "
                 "over five test years within 0.1; on CWatM's 20 validation days it moved lead 1 of two seeds "
                 "of six and did harm; docs/skill.md)")
    _option(p, "quantile_log_weight", type=float, metavar="W",
            help="probabilistic: add W times the pinball loss of the log values to the physical one (the same "
                 "quantiles minimise both; the log term fits the middling flows as well as the largest). With "
                 "--calibrate_levels on an eight-year record, W=0.3 narrowed the widest reliability gap of the "
                 "test year to 0.12 on two worlds at 0-7%% more CRPS; over seven test years it was less reliable "
                 "than the defaults, and on a two-year record it did not help (docs/skill.md; default 0)")
    _option(p, "max_train_windows", type=int, help="cap on training windows per epoch (evenly spaced, the same each "
            "epoch)")
    _option(p, "max_val_windows", type=int, help="cap on validation windows (evenly spaced, the same each epoch): "
            "validation forecasts whole maps, which on a large grid can take far longer than training on patches")
    _option(p, "precision", choices=("auto", "fp32", "bf16", "fp16"),
            help="mixed precision: auto (bf16 on CUDA where supported, else fp16; fp32 on CPU/MPS), fp32, bf16, fp16")
    _option(p, "storage_options", help="JSON options for fsspec URLs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="forecast GeoTIFFs (and figures) from a checkpoint and a cube or rasters")
    _option(p, "weights_path", required=True, nargs="+", metavar="WEIGHTS_PATH",
            help="checkpoint, e.g. checkpoints/best.pth; several trained alike (e.g. seeds/*/best.pth) forecast "
                 "together: the mean of their maps, or a probabilistic model's quantiles pooled")
    _option(p, "input_dir", required=True, help="Zarr cube, or folder of rasters (ingested into stores/<name>.zarr)")
    _option(p, "output_dir", default="outputs/predictions", help="where the GeoTIFFs go (default outputs/predictions)")
    _option(p, "dates", help="issue days START:END (YYYY-MM-DD:YYYY-MM-DD), or one day")
    _option(p, "last", action="store_true", help="only the latest possible issue day")
    _option(p, "split", help="only windows whose targets lie in the checkpoint's train, val or test split, or in "
            "a period START..END (YYYY-MM-DD..YYYY-MM-DD, either end may be left out)")
    _option(p, "format", choices=("tif", "netcdf"), default="tif", help="netcdf: also one CF NetCDF of all forecasts")
    _option(p, "tile", type=int, default=512,
            help="predict larger grids piece by piece, at most this many pixels a side (as the whole grid would be)")
    _option(p, "batch_size", type=int, default=8, help="issue days per forward pass (default 8)")
    _option(p, "quantiles", help="probabilistic checkpoints: quantile maps to write (default 0.1,0.5,0.9)")
    _option(p, "exceedance", help="probabilistic checkpoints: write P(QS > threshold) maps, thresholds in data units "
            "(default: the training p90 and p99 of wet pixels)")
    _option(p, "members", type=int, help="probabilistic checkpoints: N ensemble members into the NetCDF output "
            "(with --format netcdf)")
    _option(p, "plots_dir", default="outputs/plots", help="where the side-by-side figures go")
    _option(p, "max_plots", type=int, default=8, help="figures spread over the forecasts (0: none, -1: all)")
    _forcings_from_option(p, "forecasting")
    _option(p, "device", default="auto", help="auto, cpu, cuda or mps")
    _option(p, "storage_options", help="JSON options for fsspec URLs")
    _scheduler_option(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="score the model against persistence and climatology per lead time")
    _option(p, "weights_path", required=True, nargs="+", metavar="WEIGHTS_PATH",
            help="checkpoint, e.g. checkpoints/best.pth; several trained alike (e.g. seeds/*/best.pth) forecast "
                 "together: the mean of their maps, or a probabilistic model's quantiles pooled")
    _option(p, "data_dir", default="stores/qs.zarr", help="Zarr cube or raster folder (default stores/qs.zarr)")
    _option(p, "split", default="test", help="train, val, test (default), all, or a period START..END "
            "(YYYY-MM-DD..YYYY-MM-DD, either end may be left out: e.g. the days that arrived after training)")
    _option(p, "output_dir", default="outputs/evaluation", help="where metrics and figures go")
    _option(p, "thresholds", help="event thresholds in data units, e.g. 5,20 (default: training p90, p99 of wet pixels)")
    _forcings_from_option(p, "scored")
    _option(p, "mask", metavar="RASTER", help="score only the pixels this raster on the cube's grid selects (neither 0 "
            "nor nodata), e.g. a catchment rasterised in QGIS: every score, the area's mean and the default thresholds")
    _option(p, "batch_size", type=int, default=8, help="windows per forward pass (default 8)")
    _option(p, "device", default="auto", help="auto, cpu, cuda or mps")
    _option(p, "storage_options", help="JSON options for fsspec URLs")
    _scheduler_option(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="calibrate a probabilistic checkpoint's spread again on a period of your "
                       "choice (no training), into a new checkpoint")
    _option(p, "weights_path", required=True, help="probabilistic checkpoint, e.g. checkpoints/best.pth")
    _option(p, "data_dir", default="stores/qs.zarr", help="Zarr cube or raster folder (default stores/qs.zarr)")
    _option(p, "split", required=True, help="the days to calibrate on: val, or a period START..END "
            "(YYYY-MM-DD..YYYY-MM-DD); several years beat one (docs/skill.md, \"Seven test years instead of one\")")
    _option(p, "output_path", required=True, help="the new checkpoint (must not exist)")
    _option(p, "calibration", choices=CALIBRATION_RULES, help="the rule (default: the checkpoint's own)")
    _option(p, "calibrate_levels", action=argparse.BooleanOptionalAction, default=None,
            help="also calibrate the levels per flow class (default: as the checkpoint was trained)")
    _option(p, "calibrate_location", action=argparse.BooleanOptionalAction, default=None,
            help="also choose, per lead, whether the quantiles move onto the centre's mean (default: as the "
                 "checkpoint was trained; see runoff train --calibrate_location)")
    _option(p, "forcing_error", type=float, metavar="SIGMA",
            help="calibrate with the forcings times a forecast error of this log std (default: the checkpoint's "
                 "--forcing_error; 0 on a cube whose forcings are forecasts already)")
    _option(p, "forcing_error_area", type=float, metavar="SIGMA",
            help="and times one factor per map of this log std (default: the checkpoint's --forcing_error_area)")
    _option(p, "batch_size", type=int, default=8, help="windows per forward pass (default 8)")
    _option(p, "device", default="auto", help="auto, cpu, cuda or mps")
    _option(p, "storage_options", help="JSON options for fsspec URLs")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("synth", help="write a synthetic but physically plausible daily QS series")
    p.add_argument("out_dir", help="folder for the daily files (QS_YYYYMMDD.tif, or Qs/ and one folder per "
                   "covariate)")
    _option(p, "days", type=int, default=730, help="number of days (default 730)")
    _option(p, "height", type=int, default=128, help="rows (default 128)")
    _option(p, "width", type=int, default=160, help="columns (default 160)")
    _option(p, "crs", default="EPSG:2154", help="CRS of the grid, 1 km pixels (default EPSG:2154)")
    _option(p, "seed", type=int, default=0, help="random seed: the same seed writes the same series (default 0)")
    _option(p, "start", default="2019-01-01", help="first day, YYYY-MM-DD")
    _option(p, "format", choices=("tif", "png"), default="tif", help="GeoTIFF (default) or 16-bit PNG with a "
            "world file")
    _option(p, "covariates", help="also write driving variables: rainf, rainf_fc (a forecast of the rain with a "
            "log-normal error), soilm; and with --regime river the static map upstream_area")
    _option(p, "regime", choices=("cells", "river"), default="cells",
            help="cells: runoff where the rain falls; river: runoff gathered along a river network with a slow "
                 "recession (persistent, heavy-tailed, mostly dry)")
    _option(p, "png_scale", type=float, default=200.0, help="value of the largest PNG code")
    p.set_defaults(func=cmd_synth)
    return parser


# the packages whose exceptions report an object store's answer (or its silence) to fsspec
_OBJECT_STORE_CLIENTS = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "azure", "google")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"runoff: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``runoff`` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad option (its line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    warnings.showwarning = _one_line_warning
    warnings.simplefilter("ignore")  # libraries' notices are for developers, not for CLI users
    warnings.simplefilter("always", RunoffWarning)
    for name, value in vars(args).items():  # file:// is this machine: a local path, as GDAL and zarr take it
        if isinstance(value, str) and value.startswith("file://"):
            setattr(args, name, value[len("file://"):])
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except RunoffError as exc:
        print(f"runoff: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, full disk, vanished files: the user's environment
        where = exc.filename or ""
        print(f"runoff: error: {where}{': ' if where else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__module__.partition(".")[0] not in _OBJECT_STORE_CLIENTS:
            raise
        # an endpoint that does not answer, a bucket that refuses: where the user pointed, not a bug
        print(f"runoff: error: the object store failed ({type(exc).__name__}: {first_line(exc)})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("runoff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
