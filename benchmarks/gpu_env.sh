# Source this on a GPU machine that has torch but no network: installs the carried wheels
# (.whl/: mlflow-skinny, optuna and their missing needs) into /tmp/site and puts the repo
# and them on PYTHONPATH. Usage: source benchmarks/gpu_env.sh
set -e
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
gatelab() { python3 -m lab "$@"; }
set +e
