# `make test` and `make demo` each set up their own virtual environment on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: test demo bench gradio clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)            # torch first: everything else builds against it
	$(PY) -m pip install -q -e ".[test,basicsr,gradio,mcp,ray,retinaface,upscale,onnx]"
	$(PY) -m pip install -q --no-deps --no-build-isolation basicsr-fixed==1.4.2 facexlib==0.3.0
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m dmdnet_plugin.demo

gradio: $(STAMP)
	$(PY) gradio_app.py

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
