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

bench: setup
	@.venv/bin/python bench/buffer.py
	@.venv/bin/python bench/rollout.py
	@.venv/bin/python bench/async_speedup.py
	@.venv/bin/python bench/weight_sync.py

clean:
	rm -rf runs .cache
