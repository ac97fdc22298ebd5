VENV ?= .venv
PY := $(VENV)/bin/python
export TF_ENABLE_ONEDNN_OPTS := 0
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: setup test demo clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -n 2 --dist loadfile -q tests

demo: setup
	$(PY) -m data_prep.synthetic --out demo/cohort --patients 40
	$(PY) -m data_prep.prepare --source demo/cohort --data_dir demo/prepared \
		--normalization per_channel_clip_q98 --image_size 128

clean:
	rm -rf $(VENV) demo
