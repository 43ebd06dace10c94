#!/usr/bin/env bash
# `make run`: the main job end to end on one machine. Builds (once, cached) the tiny warm-started model,
# then `honcho start` runs redis + learner + actor(s) from the Procfile until the learner finishes.
#   DCRL_CONFIG=tiny (default) | path/to/config.toml     DCRL_ACTORS=1 (actor processes)
#   DCRL_RESUME=1 keeps runs/<name> and resumes from its last checkpoint instead of starting afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export DCRL_CONFIG=${DCRL_CONFIG:-tiny}
ACTORS=${DCRL_ACTORS:-1}

if [ ! -f .env ]; then
  # A per-checkout Redis password: the Procfile's redis-server requires it, every process reads it.
  printf 'DCRL_REDIS_PASSWORD=%s\n' "$(python -c 'import secrets; print(secrets.token_hex(16))')" > .env
fi
# A bad config (DCRL_CONFIG, DCRL_SET) stops here with one error line, exit 2, like every dcrl command.
dirs=$(python -c "
import sys
from configs import ConfigError, load_config
try:
    c = load_config(sys.argv[1])
except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
print(c.run.dir); print(c.redis.data_dir)" "$DCRL_CONFIG")
{ read -r run_dir; read -r redis_dir; } <<< "$dirs"
if [ "${DCRL_RESUME:-0}" != 1 ]; then
  rm -rf "$run_dir" "$redis_dir"
fi

python -m tiny --config "$DCRL_CONFIG"
echo "[run] honcho start -c actor=$ACTORS  (config $DCRL_CONFIG; logs below; Ctrl-C stops everything)"
set +e
honcho start -f Procfile -e .env -c "actor=$ACTORS"
rc=$?
set -e
if [ -f "$run_dir/metrics.jsonl" ]; then
  python -m learner report --run-dir "$run_dir" >/dev/null 2>&1 || true
  echo "[run] metrics: $run_dir/metrics.jsonl"
  echo "[run] report:  $run_dir/report.png"
fi
exit $rc
