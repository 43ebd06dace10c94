# dcrl: the two commands of the README. Both run the idempotent set-up first.
.PHONY: setup run test test-unit bench clean

setup:
	@bash scripts/setup.sh

## run: train the tiny model end to end on CPU (redis + learner + actor under honcho)
run: setup
	@bash scripts/run_local.sh

## test: the whole test suite (real redis-server, real vLLM on CPU)
test: setup
	@.venv/bin/python -m pytest -q $(PYTEST_ARGS)

## test-unit: the fast tier (no vLLM engine, no end-to-end process runs), about a minute
test-unit: setup
	@.venv/bin/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

## bench: every benchmark, then one table of RESULT lines (installs the `bench` extra: TRL). BENCH_ARGS=--quick
bench: setup
	@.venv/bin/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf runs .cache
