# The README's two commands: `make demo` (set up, run the main job on the default model) and
# `make test` (set up, run the tests). Both create .venv on first use.

VENV    ?= .venv
PYTHON  ?= python3
MODEL   ?= digits-sd
OUT     ?= out/$(MODEL)
# The CPU build of torch is installed before the package so no dependency can pull a multi-GB
# CUDA build. On this project's machines `torch==2.13.0` is a CPU wheel on local disk; elsewhere
# pass the torch you want, e.g. `make TORCH_SPEC="torch==2.13.0+cpu" ...` with your index configured.
TORCH_SPEC ?= torch==2.13.0

BIN := $(VENV)/bin

.PHONY: setup demo test test-all lint bench-export bench-build bench-matrix bench-sdxl bench-onnxruntime bench-compress bench-tensorrt bench-coreml bench-torch clean

$(BIN)/.installed: pyproject.toml web/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,openvino,compress,coreml,web,farm]"
	scripts/install_web_runtime.sh
	# OpenVINO GenAI, optimum-intel and optimum-onnx, each in its own environment (diffship/clients says why)
	$(BIN)/diffship clients install
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/diffship build --model $(MODEL) --out $(OUT)

# `make test`: every feature end to end, within CI's budget (docs/testing.md); `make test-all` adds the exhaustive
# variants (marker `slow`). Both print the 15 slowest items.
test: setup
	$(BIN)/python -m pytest -m "not slow" --durations=15

test-all: setup
	$(BIN)/python -m pytest --durations=15

# ruff, the layers contract (pyproject's [tool.importlinter]), no import cycle between modules and every late import
# with its reason, mypy on the target protocol and the stages, and the guards that no module outside
# models/families names a family or the UNet
lint: setup
	$(BIN)/ruff check diffship tests benchmarks scripts
	$(BIN)/lint-imports
	$(BIN)/python scripts/check_import_cycles.py
	$(BIN)/mypy diffship/targets/base.py diffship/stages
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_structure.py \
		tests/test_families.py::test_no_module_outside_the_families_names_a_family \
		tests/test_families.py::test_no_module_outside_the_families_names_the_unet \
		tests/test_families.py::test_the_unet_guard_catches_each_way_of_naming_it

bench-export: setup
	$(BIN)/python benchmarks/export_unet.py

bench-build: setup
	$(BIN)/python benchmarks/build_pipeline.py

bench-matrix: setup
	$(BIN)/python benchmarks/build_matrix.py

# Issue 23: the full SDXL build (sdxl-arch at 1024x1024, ONNX Runtime FP32 + INT8, OpenVINO BF16 + int8-hybrid, whole
# validation) as one `diffship build`, its whole process tree's peak RSS sampled per stage.
bench-sdxl: setup
	$(BIN)/python benchmarks/build_matrix.py --recipe benchmarks/recipes/sdxl-24gib.toml \
		--group onnxruntime:fp32+int8,openvino:bf16+int8-hybrid --out out/bench-sdxl --json out/bench-sdxl/figures.json

bench-onnxruntime: setup
	$(BIN)/python benchmarks/onnxruntime_unet.py

bench-compress: setup
	$(BIN)/python benchmarks/compress_digits.py

clean:
	rm -rf out .pytest_cache .ruff_cache

bench-tensorrt: setup
	$(BIN)/python benchmarks/gpu_tensorrt_unet.py

bench-coreml: setup
	cd benchmarks && ../$(BIN)/python coreml_unet.py --work ../out/bench-unet

bench-torch: setup
	cd benchmarks && ../$(BIN)/python torch_unet.py --work ../out/bench-torch
