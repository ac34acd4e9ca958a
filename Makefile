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

.PHONY: setup demo test test-all lint bench-export bench-build bench-matrix bench-sdxl bench-flux bench-sd35m bench-image bench-onnxruntime bench-compress bench-tensorrt bench-coreml bench-torch clean

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

# Issue 45: flux-arch's 12B transformer through export, OpenVINO INT8 / INT4, per-block parity and an image, each stage
# in a 20 GiB memory cgroup (about 67 GB of disk); sd35m-arch (SD3.5-medium's shapes, T5-XXL) as one `diffship build`
# within 20 GiB (about 64 GB of unique files). On ext4 the cache and the output go on a copy-on-write XFS volume in a
# sparse file (BENCH_VOLUME, made and mounted by benchmarks/reflink_volume.sh; needs root): the sparse file takes what
# is written, so one of the two at a time on a disk with 73 GB free.
BENCH_VOLUME ?= /work/bench-volume
# a commit to run the full-size transformer builds on (benchmarks/pinned.sh: a resumed build needs the code that began it)
PIN ?=
bench-flux: setup
	sh benchmarks/reflink_volume.sh $(BENCH_VOLUME).img $(BENCH_VOLUME)
	DIFFSHIP_MEMORY_GIB=20 $(BIN)/python benchmarks/dit_streaming.py --model flux-arch --short-t5 --size 512 \
		--cgroup-gib 20 --work $(BENCH_VOLUME)/flux --json $(BENCH_VOLUME)/flux.json

bench-sd35m: setup
	sh benchmarks/reflink_volume.sh $(BENCH_VOLUME).img $(BENCH_VOLUME)
	$(if $(PIN),sh benchmarks/pinned.sh $(PIN)) $(abspath $(BIN))/python benchmarks/build_matrix.py \
		--recipe benchmarks/recipes/sd35m-20gib.toml \
		--group onnxruntime:fp32+int8,openvino:bf16+int8-hybrid --cache $(BENCH_VOLUME)/cache \
		--out $(BENCH_VOLUME)/sd35m --json $(BENCH_VOLUME)/sd35m.json --cgroup-gib 20

# Issue 46: the fastest whole image within the budget: sd15-arch at 512x512, 20 steps, built with accelerations, then
# its recommended row timed against PyTorch FP32 eager and BF16 in one run; digits-sd's prompt accuracy under the same.
bench-image: setup
	$(BIN)/python benchmarks/deep_cache_work.py
	$(BIN)/diffship build benchmarks/recipes/sd15-accelerated.toml --out out/bench-image
	$(BIN)/python benchmarks/image_speed.py out/bench-image --runs 3 --json out/bench-image/speed.json
	$(BIN)/diffship build benchmarks/recipes/digits-accelerated.toml --out out/bench-image-digits

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
