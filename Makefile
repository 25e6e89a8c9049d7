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

demo: $(STAMP)
	test -f data/input/QS_20201230.tif || $(RUNOFF) synth data/input --days 730 --height 128 --width 160 --crs EPSG:2154 --seed 0
	$(RUNOFF) ingest data/input stores/qs.zarr
	$(RUNOFF) info stores/qs.zarr

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_ingest.py

clean:
	rm -rf $(VENV) stores/*.zarr data outputs checkpoints
