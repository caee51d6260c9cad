# Source this on a GPU machine that has torch but no network: installs the carried wheels
# (.whl/: mlflow-skinny, optuna and their missing needs) into /tmp/site and puts the repo
# and them on PYTHONPATH. Usage: source benchmarks/gpu_env.sh
# A warm machine keeps /tmp/site between calls: the same wheels are not installed again, so
# the bytecode Python wrote at the first call's imports (pip's --no-compile leaves that to
# the first import) serves the next calls' processes too, a grid's workers included.
set -e
if [ -d .whl ]; then
  # (names and sizes: a call's copy of the tree gives the files new times)
  wheels=$(cd .whl && stat -c '%n %s' -- *.whl | sha256sum | cut -c1-16)
  if [ "$(cat /tmp/site/.gatelab-wheels 2>/dev/null)" != "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    echo "$wheels" > /tmp/site/.gatelab-wheels
  fi
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
gatelab() { python3 -m lab "$@"; }
set +e
