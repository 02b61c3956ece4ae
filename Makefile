# Entry points. `make` builds; `make demo` and `make test` also install dependencies first.
BUILD      ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
TSAN_BUILD ?= build-tsan
JOBS       ?= $(shell nproc)
CMAKE_GEN  := -G Ninja

.PHONY: all deps build asan tsan demo test test-fast test-asan bench crash-long fuzz fuzz-long format clean

all: build

deps:
	@./scripts/install-deps.sh

$(BUILD)/build.ninja:
	@cmake -S . -B $(BUILD) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null

$(ASAN_BUILD)/build.ninja:
	@cmake -S . -B $(ASAN_BUILD) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=Debug -DQCOW2KIT_SANITIZE=ON >/dev/null

$(TSAN_BUILD)/build.ninja:
	@cmake -S . -B $(TSAN_BUILD) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQCOW2KIT_TSAN=ON >/dev/null

$(FUZZ_BUILD)/build.ninja:
	@cmake -S . -B $(FUZZ_BUILD) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_CXX_COMPILER=clang++ -DQCOW2KIT_FUZZ=ON >/dev/null

build: $(BUILD)/build.ninja
	@cmake --build $(BUILD) -j $(JOBS)

asan: $(ASAN_BUILD)/build.ninja
	@cmake --build $(ASAN_BUILD) -j $(JOBS)

# The unit tests under ThreadSanitizer (only the multi-threaded ones are run there).
tsan: $(TSAN_BUILD)/build.ninja
	@cmake --build $(TSAN_BUILD) -j $(JOBS) --target unit_tests

# Builds, makes a sample image with qemu-img and shows what qcow2kit reads from it.
demo: deps build
	@./scripts/demo.sh $(BUILD)/qcow2kit

# The whole suite, normally and under AddressSanitizer + UndefinedBehaviorSanitizer, the
# multi-threaded tests under ThreadSanitizer, then each fuzz target for a short fixed time.
# The normal run may skip nothing: deps installed everything the cases need.
test: deps build asan tsan
	@QCOW2KIT_NO_SKIP=1 ctest --test-dir $(BUILD) -j $(JOBS) --output-on-failure
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --test-dir $(ASAN_BUILD) -j $(JOBS) --output-on-failure
	@TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
	  ctest --test-dir $(TSAN_BUILD) -j $(JOBS) --output-on-failure -R '$(THREADED_TESTS)'
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=10

# The tests that run several threads (make test runs them under ThreadSanitizer too).
THREADED_TESTS := SharedDevice|Inbox|ConcurrencyTest|PaddedWrite|WorkerPool

test-fast: build
	@ctest --test-dir $(BUILD) -j $(JOBS) --output-on-failure

# The long power-fail and fault-injection run (CI runs a short one): about 20 minutes.
CRASH_CUTS   ?= 20000
FAULT_POINTS ?= 400
crash-long: deps build
	@QCOW2KIT_CRASH_CUTS=$(CRASH_CUTS) QCOW2KIT_FAULT_POINTS=$(FAULT_POINTS) \
	  $(BUILD)/unit_tests --gtest_filter='*CrashTest*' --gtest_brief=1

# libFuzzer targets (fuzz/, clang, ASan + UBSan) on seeds made by fuzz/make_corpus.py.
FUZZ_SECONDS ?= 60
fuzz: deps build $(FUZZ_BUILD)/build.ninja
	@cmake --build $(FUZZ_BUILD) -j $(JOBS) --target fuzz_all
	@python3 fuzz/run.py --build $(FUZZ_BUILD) --qcow2kit $(BUILD)/qcow2kit --seconds $(FUZZ_SECONDS)

# Hours of fuzzing: an hour per target.
fuzz-long:
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=3600

bench: deps build
	@python3 bench/bench_read.py --qcow2kit $(BUILD)/qcow2kit
	@python3 bench/bench_write.py --qcow2kit $(BUILD)/qcow2kit
	@python3 bench/bench_nbd.py --qcow2kit $(BUILD)/qcow2kit
	@python3 bench/bench_check.py --qcow2kit $(BUILD)/qcow2kit
	@python3 bench/bench_convert.py --qcow2kit $(BUILD)/qcow2kit
	@python3 bench/bench_ublk.py --qcow2kit $(BUILD)/qcow2kit

format:
	@clang-format -i $$(git ls-files '*.cc' '*.h')

clean:
	@rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD)
