#!/usr/bin/env bash
# End-to-end demo on the embedded synthetic ECGs (CPU, a few minutes):
# train a ViT teacher, train the CNN student with the task loss only, distil
# the student from the frozen teacher with logit KD and with EVL (MHCA + OT +
# relation + KD, docs/evl.md) and with its control (EVL fed another record's
# teacher outputs), evaluate them all, print the table and the distillation
# diagnostics (does EVL depend on which record the teacher saw?).
# Usage: [VARIANTS=...] launch/demo.sh [WORKDIR] [extra --config.* overrides]
#   VARIANTS are config variants added to every run, e.g.
#   VARIANTS=model=xresnet1d (an XResNet1D student) or VARIANTS=student_leads=I
#   (a lead-I student of the 12-lead teacher); the default WORKDIR is then
#   workdir/demo_<variants>.
set -euo pipefail
VARIANTS=${VARIANTS:-}
SUFFIX=${VARIANTS:+_${VARIANTS//[=,+]/-}}
WORKDIR=${1:-workdir/demo${SUFFIX}}
shift || true
PY=${PYTHON:-python}
CFG="configs/default.py"
V=${VARIANTS:+,${VARIANTS}}
DATA=(--config.data.data_dir="${WORKDIR}/tfds")
# The distilled runs read the frozen teacher's outputs from a cache written
# once under the teacher's workdir (train/teacher_store.py; no
# augmentations here), instead of running the teacher at every step.
TEACHER=(--config.teacher.init="${WORKDIR}/teacher"
         --config.teacher.cache_features=True)
# The five runs compile many of the same programs (the student's evaluation,
# the teacher's forward): one persistent XLA cache for all of them.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${WORKDIR}/jax_cache}
# A size limit turns on jax's file lock around cache reads and writes: two
# runs at a time share the cache, and an unlocked reader can load an entry
# the other process is still writing (an XLA abort).
export JAX_COMPILATION_CACHE_MAX_SIZE=${JAX_COMPILATION_CACHE_MAX_SIZE:-4294967296}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.2}


# Two runs at a time where they do not depend on each other (the task-only
# student beside the teacher, the KD student beside EVL): at these sizes
# one run keeps two cores only partly busy (compiles are single-threaded).
# A background run's console goes to its log; its result line is printed
# when it ends (its whole log, and the demo stops, if it fails). The data
# is prepared first, once (`--prepare_only`), not by two runs at a time.
mkdir -p "${WORKDIR}"
declare -A PIDS
# A failed foreground run stops the demo: take its background partner too.
trap 'jobs -p | xargs -r kill 2>/dev/null || true' EXIT
background() {  # NAME ARGS...: main in the background
  local name=$1
  shift
  "$PY" -m evl_ecg_jax.main "$@" >"${WORKDIR}/${name}.console.txt" 2>&1 &
  PIDS[$name]=$!
}
finish() {  # NAME: waits for a background run; its result line
  if ! wait "${PIDS[$1]}"; then
    cat "${WORKDIR}/$1.console.txt" >&2
    echo "demo: the $1 run failed (log above)." >&2
    exit 1
  fi
  grep -a "metrics.json:" "${WORKDIR}/$1.console.txt" | tail -n 1
}

"$PY" -m evl_ecg_jax.main --config="${CFG}:mode=train_teacher${V}" \
  --workdir="${WORKDIR}/teacher" "${DATA[@]}" --prepare_only "$@"
background student_ce --config="${CFG}:mode=distill,loss=ce${V}" \
  --workdir="${WORKDIR}/student_ce" "${DATA[@]}" "$@"
"$PY" -m evl_ecg_jax.main --config="${CFG}:mode=train_teacher${V}" \
  --workdir="${WORKDIR}/teacher" "${DATA[@]}" "$@"
finish student_ce
background student_kd --config="${CFG}:mode=distill,loss=kd${V}" \
  "${TEACHER[@]}" --workdir="${WORKDIR}/student_kd" "${DATA[@]}" "$@"
"$PY" -m evl_ecg_jax.main --config="${CFG}:mode=distill,loss=evl${V}" \
  "${TEACHER[@]}" \
  --workdir="${WORKDIR}/student_evl" "${DATA[@]}" "$@"
finish student_kd
"$PY" -m evl_ecg_jax.main --config="${CFG}:mode=distill,loss=evl_shuffled${V}" \
  "${TEACHER[@]}" \
  --workdir="${WORKDIR}/student_evl_shuffled" "${DATA[@]}" "$@"
"$PY" -m evl_ecg_jax.eval.report --out="${WORKDIR}/report.md" \
  "teacher (ViT1D)=${WORKDIR}/teacher" \
  "student, task loss only=${WORKDIR}/student_ce" \
  "student, distilled (KD)=${WORKDIR}/student_kd" \
  "student, distilled (EVL)=${WORKDIR}/student_evl" \
  "student, EVL control (shuffled teacher)=${WORKDIR}/student_evl_shuffled"
