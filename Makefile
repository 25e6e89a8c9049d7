# Two entry points: `make demo` (the main job end to end on synthetic data) and
# `make test` (the whole suite). Both create .venv and install what they need.
VENV   := .venv
PY     := $(VENV)/bin/python
RUNOFF := $(VENV)/bin/runoff
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Each step reuses what is already there: the data, the cube (ingest skips identical days)
# and the model (resuming a finished run does nothing). The data: runoff gathered along a
# river network, with its rain (runoff synth --regime river); the model gets the rain of the
# days it forecasts (the observed rain: a perfect forecast).
demo: $(STAMP)
	@test -f data/river/Qs/QS_20201230.tif || $(RUNOFF) synth data/river --days 730 --height 128 --width 160 --crs EPSG:2154 --seed 0 --regime river --covariates rainf,rainf_fc
	$(RUNOFF) ingest data/river stores/river.zarr
	$(RUNOFF) train --data_dir stores/river.zarr --forcings rainf --epochs 15 --patience 5 --batch_size 8 --hidden_channels 16 --kernel_size 3 \
		--checkpoint_dir checkpoints/river $$(test -f checkpoints/river/last.pth && echo --resume checkpoints/river/last.pth)
	$(RUNOFF) predict --weights_path checkpoints/river/best.pth --input_dir stores/river.zarr --output_dir outputs/predictions --split test
	$(RUNOFF) evaluate --weights_path checkpoints/river/best.pth --data_dir stores/river.zarr --split test
	@echo "cube:        stores/river.zarr  (runoff info stores/river.zarr)"
	@echo "model:       checkpoints/river/best.pth  (runoff info checkpoints/river/best.pth)"
	@echo "forecasts:   outputs/predictions/QS_*_lead1.tif"
	@echo "figures:     outputs/plots/  (loss_curves.png, compare_*.png)"
	@echo "evaluation:  outputs/evaluation/  (metrics.md, skill_by_lead.png, nse_map_lead1.tif, kge_map_lead1.tif)"

test: $(STAMP)
	$(PY) -m pytest

# One table of measured ratios (BENCHMARKS.md), then the cost curves (docs/scaling.png).
bench: $(STAMP)
	$(PY) -m pip install -q xbatcher
	$(PY) benchmarks/report.py
	$(PY) benchmarks/bench_scaling.py --plot docs/scaling.png

clean:
	rm -rf $(VENV) stores/*.zarr stores/.*.lock data outputs checkpoints
