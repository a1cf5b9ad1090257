# ray-zerocopy: every set-up, build and test step. A fresh clone needs only
# Rust, a C/C++ compiler, Python 3.11 and pip:
#   make demo   set up everything, run the Ray Data demo
#   make test   set up everything, run every test (Rust, C, C++, Python)

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
BUILD  := build
LIBDIR := target/release
LIB    := $(LIBDIR)/librzc.so
FIXTURES := $(BUILD)/fixtures
VALGRIND := valgrind -q --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=all
FUZZ_SECONDS ?= 60
TEST_FUZZ_SECONDS ?= 20
export RAY_AUTH_MODE ?= disabled

.PHONY: docs wheel demo bench-actors bench-load test-fuzz setup tools native venv python fixtures header lint test test-rust test-c test-header-c test-python test-gpu test-gpu-busy fakecuda gpu-bundle fuzz bench bench-core examples clean

# Everything the tests need is built or installed here, before any test runs.
setup: venv native python fakecuda fixtures tools

# Tools the tests run: cargo-fuzz (the fuzz target).
tools:
	command -v cargo-fuzz >/dev/null || cargo install -q cargo-fuzz --locked

venv: $(VENV)/.installed
$(VENV)/.installed: python_shim/requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r python_shim/requirements-dev.txt
	touch $@

# librzc (C and C++ callers, examples) and the rzc tool, in one build.
native:
	cargo build --release -p rzc-capi -p rzc-cli

fixtures: venv
	$(VPY) tests/fixtures/make_fixtures.py $(FIXTURES)

# Regenerates include/rzc.h from the Rust sources (checked by test-rust).
header:
	RZC_BLESS_HEADER=1 cargo test -q -p rzc-capi --test header

test: setup lint test-rust test-c test-python test-gpu wheel docs test-fuzz
	@echo "all tests passed"

# Lints: clippy with warnings as errors (the workspace lints in Cargo.toml
# included), rustfmt, and ruff on the Python package, tests, benchmarks and
# examples (ruff.toml).
lint: venv
	cargo clippy -q --workspace --all-targets -- -D warnings
	cargo fmt --all --check
	$(VPY) -m ruff check -q python_shim tests benchmarks examples

# `cargo test` links tests against the rlib only; the libloading tests need
# the cdylib built first. The device layer's tests need the stand-in driver
# (they are marked ignored without it) and run here with it.
test-rust: fakecuda
	cargo build --workspace
	cargo test --workspace
	# One test switches users, which needs root (CI runs as root): elsewhere
	# it is left out, and said so.
	if [ "$$(id -u)" = 0 ]; then \
	  LD_LIBRARY_PATH=$(CURDIR)/$(FAKECUDA) cargo test -p rzc-cuda -- --include-ignored; \
	else \
	  LD_LIBRARY_PATH=$(CURDIR)/$(FAKECUDA) cargo test -p rzc-cuda -- --include-ignored --skip another_user_is_recognised && \
	  echo "skipped: share::wire::tests::another_user_is_recognised needs root"; \
	fi

# The header compiles standalone as C99 and C++17, and after a real dlpack.h
# (the copy torch ships, DLPack 1.3); the C and C++ callers run under
# valgrind (no leaks, no invalid reads).
test-header-c: venv
	@mkdir -p $(BUILD)
	echo '#include "rzc.h"' > $(BUILD)/header_only.c
	printf '#include "dlpack.h"\n#include "rzc.h"\n' > $(BUILD)/header_after_dlpack.c
	gcc -std=c99 -pedantic -Wall -Wextra -Werror -Iinclude -fsyntax-only $(BUILD)/header_only.c
	g++ -std=c++17 -pedantic -Wall -Wextra -Werror -Iinclude -fsyntax-only -x c++ $(BUILD)/header_only.c
	g++ -std=c++17 -pedantic -Wall -Wextra -Werror -Iinclude -fsyntax-only -x c++ include/rzc.hpp
	DLPACK_DIR=$$($(VPY) -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include", "ATen"))') && \
	  gcc -std=c99 -pedantic -Wall -Wextra -Werror -Iinclude -I$$DLPACK_DIR -fsyntax-only $(BUILD)/header_after_dlpack.c && \
	  g++ -std=c++17 -pedantic -Wall -Wextra -Werror -Iinclude -I$$DLPACK_DIR -fsyntax-only -x c++ $(BUILD)/header_after_dlpack.c

test-c: native fixtures test-header-c
	gcc -std=c99 -Wall -Wextra -Werror -Iinclude tests/c/test_rzc.c -L$(LIBDIR) -lrzc -Wl,-rpath,$(CURDIR)/$(LIBDIR) -o $(BUILD)/test_rzc_c
	g++ -std=c++17 -Wall -Wextra -Werror -Iinclude tests/cpp/test_rzc.cpp -L$(LIBDIR) -lrzc -Wl,-rpath,$(CURDIR)/$(LIBDIR) -o $(BUILD)/test_rzc_cpp
	gcc -std=c99 -Wall -Wextra -Werror -pthread -Iinclude tests/c/test_threads.c -L$(LIBDIR) -lrzc -Wl,-rpath,$(CURDIR)/$(LIBDIR) -o $(BUILD)/test_threads_c
	$(VALGRIND) $(BUILD)/test_rzc_c $(FIXTURES)
	$(VALGRIND) $(BUILD)/test_rzc_cpp $(FIXTURES)
	# The thread-safety contract: natively (threads truly at once), then
	# under valgrind (which runs one thread at a time, checking memory).
	$(BUILD)/test_threads_c $(FIXTURES)
	$(VALGRIND) --suppressions=tests/c/valgrind-threads.supp $(BUILD)/test_threads_c $(FIXTURES)
	$(MAKE) --no-print-directory examples

# The C, C++ and Rust examples, built and run on the fixture.
examples: native fixtures
	gcc -std=c99 -Wall -Wextra -Werror -Iinclude examples/c/list_tensors.c -L$(LIBDIR) -lrzc -Wl,-rpath,$(CURDIR)/$(LIBDIR) -o $(BUILD)/list_tensors_c
	g++ -std=c++17 -Wall -Wextra -Werror -Iinclude examples/cpp/list_tensors.cpp -L$(LIBDIR) -lrzc -Wl,-rpath,$(CURDIR)/$(LIBDIR) -o $(BUILD)/list_tensors_cpp
	$(BUILD)/list_tensors_c $(FIXTURES)/sample.safetensors
	$(BUILD)/list_tensors_cpp $(FIXTURES)/sample.safetensors
	cargo run -q --release -p rzc-core --example list_tensors -- $(FIXTURES)/sample.safetensors

# A short, fixed fuzzing budget in every test run; `make fuzz FUZZ_SECONDS=600`
# for a longer one.
test-fuzz:
	$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(TEST_FUZZ_SECONDS)

# libFuzzer on open-from-memory for FUZZ_SECONDS (cargo-fuzz needs nightly
# flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them).
fuzz: tools
	mkdir -p fuzz/corpus/open_memory
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run open_memory corpus/open_memory seeds -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096

# A Ray Data batch-inference job on local Ray, zero-copy vs plain.
demo: setup
	$(VPY) examples/python/ray_data_demo.py

bench: bench-core bench-actors bench-load
	$(VPY) benchmarks/bench_guard.py

# First load in a fresh actor: ours (guard on/off) beside ray-zerocopy 0.2.0
# from PyPI and Ray's zero-copy flag, in one run.
bench-load: setup
	$(VPY) benchmarks/bench_load.py

bench-core:
	cargo bench -p rzc-core --bench core

# ~1 GiB model, 4 actors: load time and memory, zero-copy vs plain vs pure-Python.
bench-actors: setup
	$(VPY) benchmarks/bench_actors.py

clean:
	cargo clean
	rm -rf $(BUILD) bench-results fuzz/target

# The Python package, built by maturin from python_shim/ and installed into the venv.
python: venv native
	cd python_shim && ../$(VPY) -m maturin build --release -q -i ../$(VPY) -o ../$(BUILD)/wheels
	$(VPY) -m pip install -q --force-reinstall --no-deps $$(ls -t $(BUILD)/wheels/ray_zerocopy-*.whl | head -1)

test-python: python
	$(VPY) -m pytest -q -rs tests/python tests/hardware

# The stand-in CUDA driver (a test double for CI: host memory, late copies,
# fault injection, a resource log). See tests/fakecuda/README.md.
FAKECUDA := $(BUILD)/fakecuda
fakecuda:
	bash tests/fakecuda/build.sh $(FAKECUDA)

# The GPU tests on the stand-in driver: its self-test, the C caller, and
# tests/gpu (every test, fault injection included).
STANDIN := LD_LIBRARY_PATH=$(CURDIR)/$(FAKECUDA) RZC_FAKECUDA=$(CURDIR)/$(FAKECUDA)
test-gpu: python fakecuda test-c
	bash tests/fakecuda/run_selftest.sh $(FAKECUDA)
	rm -f $(FAKECUDA)/c-log.jsonl $(FAKECUDA)/c-threads-log.jsonl $(FAKECUDA)/pytest-log.jsonl
	# The driver (and dlopen) keep state for the life of the process: here only
	# definite and indirect leaks are errors; the driver's log says whether
	# any driver resource was left behind.
	$(STANDIN) FAKECUDA_LOG=$(CURDIR)/$(FAKECUDA)/c-log.jsonl FAKECUDA_MEM_MB=256 \
	  valgrind -q --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite,indirect $(BUILD)/test_rzc_c $(FIXTURES)
	grep -q '"op": *"alloc"' $(FAKECUDA)/c-log.jsonl && grep -q '"leaks": *0' $(FAKECUDA)/c-log.jsonl
	# The thread-safety contract's device half: uploads of one handle at
	# once in every mode to two devices, copies slowed so that they overlap
	# (natively: under valgrind it takes a minute).
	$(STANDIN) FAKECUDA_LOG=$(CURDIR)/$(FAKECUDA)/c-threads-log.jsonl FAKECUDA_DEVICES=2 FAKECUDA_COPY_DELAY_US=2000 \
	  $(BUILD)/test_threads_c $(FIXTURES)
	grep -q '"op": *"register"' $(FAKECUDA)/c-threads-log.jsonl && grep -q '"leaks": *0' $(FAKECUDA)/c-threads-log.jsonl
	$(STANDIN) FAKECUDA_LOG=$(CURDIR)/$(FAKECUDA)/pytest-log.jsonl $(VPY) -m pytest -q -rs tests/gpu
	$(MAKE) --no-print-directory test-gpu-busy

# The timing-sensitive GPU tests, twice at once: they pass on a busy machine
# too, so that load on a CI runner cannot make them flake (see the script).
test-gpu-busy: python fakecuda
	$(STANDIN) bash tests/gpu/run_busy.sh $(VPY) $(BUILD)/gpu-busy

# The distributions in build/dist: a manylinux_2_28 wheel (one py3 wheel for
# every CPython 3.10+: the native part is loaded through cffi, not compiled
# against Python), linked against glibc 2.28 with zig, checked by auditwheel
# and installed with pip alone on every Python 3.10-3.13 here; and the sdist,
# checked to build.
DIST := $(BUILD)/dist
wheel: venv
	rm -rf $(DIST)
	cd python_shim && PATH=$(CURDIR)/$(VENV)/bin:$$PATH ../$(VPY) -m maturin build -q --release --compatibility manylinux_2_28 --zig -o ../$(DIST)
	cd python_shim && ../$(VPY) -m maturin sdist -o ../$(DIST)
	$(VPY) -m auditwheel show $(DIST)/*.whl | tr -s ' \n' ' ' | grep -q 'consistent with the following platform tag: "manylinux_2_28_x86_64"'
	bash tests/wheel/check_wheel.sh $(DIST)

# The documentation site (MkDocs, Material theme, the API reference from the
# docstrings by mkdocstrings), built strictly into build/site: a broken link,
# page or reference fails. Every Python block in it runs in test-python.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict --site-dir $(BUILD)/site

# The wheel in .gpu/, for tests/gpu/run_gpu_checks.sh on a GPU machine.
gpu-bundle: wheel
	rm -rf .gpu && mkdir -p .gpu
	cp $(DIST)/ray_zerocopy-*-manylinux_2_28_x86_64.whl .gpu/
