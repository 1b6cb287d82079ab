#!/usr/bin/env bash
# The GPU run of dgl_fast in ONE command: build, the self-check, CUDA tests, compute-sanitizer, every
# benchmark at the sizes of issue 10's targets and a kernel profile, in about 8 minutes, always
# returning what it got as one tarball.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (one device call, <= 9 min)
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same script on a CPU, tiny sizes (CI, < 2 min)
#
# Output: "$OUT/gpu_check-<mode>.tar.gz" (logs/, junit xml, summary.txt, env.txt, results/ with the
# benchmark files written in this run, profile/) and "$OUT/summary.txt"; without $OUT, under
# build/gpu_check/. The summary, one line per step (name, ok/FAIL/TIMEOUT/SKIP, seconds, budget,
# expected, note), is printed last.
#
# Time: a global deadline (GPU_CHECK_DEADLINE seconds from the start, default 540 on the GPU, 300
# for the dry run) and a budget per step (`timeout`, then KILL 10 s later). A step that would start
# with less than 15 s left is skipped; a budget longer than what is left is clipped. For a shorter
# rerun: GPU_CHECK_SKIP=bench_replay,bench_memory skips steps (not the build, which skips itself
# when nothing changed), GPU_CHECK_BUDGETS=tests_ops=60,bench_overlap=90 changes budgets. Steps run in
# order of how much they tell, so a short run loses the least useful ones. Nothing stops the run
# but a failed build: every step's log is kept, the tarball is rewritten after every step (so even
# a SIGKILL from outside leaves the steps done so far), and SIGTERM/SIGINT/HUP stop the running
# step, pack and exit.
#
# Steps (budget / expected time on one H200 with 16 cores; guesses until a first run measures them).
# The two test steps and the sanitizer lane (sanitizer_check, memcheck, racecheck, memcheck_graphs,
# one after another) run side by side: none of them times anything, and the benchmarks after them
# then run alone on the device. Expected wall time: 5 + 75 + 20 + max(75, 45, 20+60+45+50 = 175)
# + 205 (benchmarks and profile) = 480 s = 8.0 min.
#   env              30 s /   5 s  GPU, driver, torch, CUDA, nvcc, compute-sanitizer, python, packages
#   build           240 s /  75 s  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 DGL_FAST_CUDA=1 pip install
#                                  --no-build-isolation --no-deps -e . ; skipped when dgl_fast already
#                                  imports with CUDA and csrc/ + setup.py are unchanged since that
#                                  build (a rerun on the same machine); stops the run if CUDA kernels
#                                  were not compiled or no GPU is visible
#   selfcheck        90 s /  20 s  python -m dgl_fast check --bench-seconds 5: every op against its
#                                  reference, graphs, streams, async, a 5 s benchmark; the fastest
#                                  signal (results/selfcheck-gpu.json)
#   tests_ops       180 s /  75 s  pytest -m cuda: the op tests (aux_head, softmax_xent, replay_buffer,
#                                  heads; ~310 CUDA tests) in one process,          } side by side
#   tests_engines   150 s /  45 s  every other test file (engine, async, trainer,   } with each other
#                                  distributed, ...; ~12) but test_simt.py in another; } and with the
#                                  no -x, 120 s a test                              } sanitizer lane
#   sanitizer_check  60 s /  20 s  compute-sanitizer --version, memcheck of a trivial torch script, and
#                                  racecheck of it with the kernel filter that racecheck uses below; a
#                                  runtime where compute-sanitizer refuses the device ("Device not
#                                  supported", error 999) gives one note line, SKIP, and the run goes on
#   memcheck        150 s /  60 s  memcheck of benchmarks/gpu_sanitize.py (every op, engine + async
#                                  steps, eager), PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that an access
#                                  past any tensor is caught (graphs cannot be captured that way)
#   racecheck       150 s /  45 s  racecheck of gpu_sanitize.py, CUDA graphs on, dgl_fast's kernels
#   memcheck_graphs 120 s /  50 s  memcheck of the engine + async steps with CUDA graphs (caching
#                                  allocator on); last in the lane: runs only if time is left
#   bench_aux_head   90 s /  20 s  mlp-sr head, VGG-13 K=4 stage outputs incl. [128,256,8,8], fp32/bf16
#                                  (TF32 off on both sides, stated in the results)
#   bench_replay    150 s /  45 s  push/sample 1-268 MB slots, batch 128 sample in a graph, async DGL
#                                  vs the authors' way (M = 30, noise 0.1 on stage 3, aux-study)
#   bench_overlap   180 s /  60 s  VGG-13 K=4 b128 fp32 + bf16/channels_last, b512 fp32 (memory),
#                                  aux-study K=6 b128 fp32: backprop graph, authors' way, 1 vs K streams
#   profile          60 s /  20 s  benchmarks/gpu_profile.py: kernels of one fused mlp-sr head step
#   bench_memory     60 s /  20 s  per-stage bytes, VGG-13 K=4 and aux-study, batch 128 and 512
#   bench_scaling    90 s /  40 s  VGG-13 K=4 b128: stage profile, predicted k-GPU throughput vs
#                                  backprop + DDP, gloo processes (2, 4) for the protocol overhead
#                                  (GLOO_SOCKET_IFNAME=lo: the machine may have no network)
#
# The dry run (--cpu-dry-run) runs every step that does not need CUDA with the same commands at
# tiny sizes: environment facts, the import check (no build), the self-check on the CPU
# (--device cpu --bench-seconds 1), both pytest commands (the CUDA tests are collected and skipped:
# SKIP), gpu_sanitize.py, each benchmark's --quick pass with the GPU
# run's options, and gpu_profile.py, with mlxtend hidden (the GPU machine has none). It exits
# non-zero when a step that ran failed; the GPU run exits 0 after packing unless the build failed.
set -uo pipefail  # no -e: a failing step must not end the run

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/benchmarks/gpu_check.sh"
cd "$ROOT" || exit 2
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"  # gloo (bench scaling, distributed tests) with no network

# --- internal subcommands (run under `timeout` as steps) ----------------------------------------

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

source_hash() {  # what the native library is built from
  find csrc setup.py -type f -print0 2>/dev/null | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64
}

sub_env() {
  local cmd
  echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   host: ${HOSTNAME:-?}   cores: $(nproc)"
  for cmd in "uname -a" "free -g" "df -h ." "nvidia-smi" \
             "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit,pstate,persistence_mode --format=csv" \
             "nvidia-smi topo -m" "nvcc --version" "ncu --version" "$PY --version" "git rev-parse HEAD" "git status --short"; do
    echo "\$ $cmd"
    timeout 20 bash -c "$cmd" 2>&1 || echo "(failed or not available: $cmd)"
    echo
  done
  local san
  if san="$(find_sanitizer)"; then echo "\$ $san --version"; timeout 20 "$san" --version 2>&1; else echo "compute-sanitizer: not found"; fi
  echo
  echo "\$ env (CUDA / torch related)"
  env | grep -E '^(CUDA|TORCH|NVIDIA|PYTORCH|MAX_JOBS|DGL_FAST|OMP|PATH=|LD_LIBRARY_PATH)' | sort
  echo
  echo "\$ $PY -m pip list (selected)"
  timeout 30 "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|numpy|pytest|ninja|nvidia-|matplotlib|scikit|mlxtend|tqdm|pybind)' || true
  echo
  timeout 60 "$PY" - <<'EOF' 2>&1
import importlib.util, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
gpu = "no GPU"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    gpu = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor})"
    print("device 0:", gpu, "| L2", getattr(p, "L2_cache_size", "?"))
for mod in ("pytest_timeout", "xdist", "matplotlib", "sklearn"):
    print(f"{mod}: {'yes' if importlib.util.find_spec(mod) else 'no'}")
try:
    import mlxtend  # noqa: F401
    print("mlxtend: yes")
except ImportError:
    print("mlxtend: no")
try:
    import dgl_fast
    cfg = dgl_fast.build_config()
    print("dgl_fast build_config:", cfg)
except Exception as exc:
    cfg = None
    print("dgl_fast does not import yet:", type(exc).__name__, str(exc)[:300])
print(f"note: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); python {platform.python_version()}")
EOF
  local drv
  drv="$(timeout 10 nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "note-extra: driver ${drv:-none}; nvcc $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | cut -d' ' -f2 || true)"
  return 0
}

sub_build() {  # $1: gpu | dry
  local want have
  want="$(source_hash)"
  have="$(cat build/gpu_check_sources.sha256 2>/dev/null || true)"
  if [ "$1" = dry ]; then
    "$PY" -c "import dgl_fast; c = dgl_fast.build_config(); print(c); print(f'note: dry run: not built; imports, CUDA kernels compiled: {c[\"cuda\"]}')"
    return $?
  fi
  if [ "$want" = "$have" ] && "$PY" -c "import sys, dgl_fast; sys.exit(0 if dgl_fast.build_config()['cuda'] else 1)" 2>/dev/null; then
    echo "dgl_fast already imports with its CUDA kernels, built from these sources: build skipped"
    echo "note: build skipped (already built from these sources)"
  else
    echo "building: no build of these sources (csrc/, setup.py) imports with CUDA yet"
    echo "\$ MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} DGL_FAST_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e ."
    if ! MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" DGL_FAST_CUDA=1 \
        "$PY" -m pip install --no-build-isolation --no-deps -e .; then
      echo "BUILD FAILED: pip install -e . returned non-zero (the compiler errors are above)"
      echo "note: pip install failed"
      return 1
    fi
    mkdir -p build && echo "$want" > build/gpu_check_sources.sha256
  fi
  "$PY" - <<'EOF'
import sys
import dgl_fast
cfg = dgl_fast.build_config()
print("build_config:", cfg)
if not cfg["cuda"]:
    print("STOP: dgl_fast was built WITHOUT its CUDA kernels (build_config()['cuda'] is False): check nvcc, "
          "CUDA_HOME and the build log above")
    print("note: CUDA kernels NOT compiled")
    sys.exit(3)
if not cfg["cuda_available"]:
    print("STOP: the CUDA kernels are compiled but torch sees no GPU (torch.cuda.is_available() is False)")
    print("note: no GPU visible to torch")
    sys.exit(4)
print(f"note: CUDA kernels compiled for {cfg['arch_list']} against torch {cfg['built_with_torch']}")
EOF
}

sub_sanitizer_check() {  # exit 0: works; 3: refuses this device (SKIP, the run goes on); else: FAIL
  local san
  san="$(find_sanitizer)" || { echo "compute-sanitizer not found"; echo "note: compute-sanitizer not found"; return 1; }
  "$san" --version || return 1
  local tiny="import torch; x = torch.arange(1000., device='cuda'); y = (x * 2).sum(); torch.cuda.synchronize(); print('sanitizer smoke:', float(y))"
  local out rc note=""
  # --report-api-errors no always: torch probes the driver with calls that fail by design
  echo "\$ $san --tool memcheck --report-api-errors no --error-exitcode 1 $PY -c <a tiny torch CUDA program>"
  out="$("$san" --tool memcheck --report-api-errors no --error-exitcode 1 "$PY" -c "$tiny" 2>&1)"
  rc=$?
  echo "$out"
  if [[ "$out" == *"Device not supported"* ]] || { [[ "$out" != *"sanitizer smoke:"* ]] && { [[ "$out" == *" 999"* ]] || [[ "$out" == *"unknown error"* ]]; }; }; then
    echo "note: compute-sanitizer refuses this device on this runtime (\"Device not supported\", then CUDA error 999): memcheck and racecheck skipped, the run goes on"
    return 3
  fi
  if [[ "$out" != *"sanitizer smoke:"* ]]; then
    echo "note: compute-sanitizer does not run a torch program here"
    return 1
  fi
  if [ "$rc" -ne 0 ]; then
    note="even a tiny torch program has memcheck reports here (see this log): the runs below will too"
  fi
  # racecheck only dgl_fast's kernels (fast; racecheck finds shared-memory hazards, our kernels' own);
  # the option's name changed across versions: look it up in the help (captured first: a pipe into
  # grep -q breaks under pipefail when grep exits early), try it on a trivial run, else racecheck everything
  local opt help
  help="$("$san" --help 2>&1)"
  for opt in --kernel-name --kernel-regex; do
    if [[ "$help" == *"$opt "* ]]; then
      echo "\$ $san --tool racecheck --report-api-errors no $opt kns=dgl_fast --error-exitcode 1 $PY -c <the same tiny program>"
      if "$san" --tool racecheck --report-api-errors no "$opt" kns=dgl_fast --error-exitcode 1 "$PY" -c \
          "import torch; x = torch.ones(64, device='cuda'); torch.cuda.synchronize(); print('racecheck smoke:', float(x.sum()))"; then
        echo "kernel filter: $opt kns=dgl_fast"
        break
      fi
    fi
  done
  local version
  version="$("$san" --version 2>/dev/null)"
  version="$(grep -i -o 'version [^ ]*' <<< "$version" | head -1)"
  echo "note: ${version:-compute-sanitizer} works${note:+; $note}"
}

case "${1:-}" in
  __env) sub_env; exit $? ;;
  __build) sub_build "${2:-gpu}"; exit $? ;;
  __sanitizer_check) sub_sanitizer_check; exit $? ;;
esac

# --- arguments, time, output ----------------------------------------------------------------------

MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu-dry-run) MODE=dry ;;
  -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed 's/^# \{0,1\}//' | grep -v '^set -uo'; exit 0 ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac

START=$(date +%s)
if [ "$MODE" = dry ]; then DEADLINE_S="${GPU_CHECK_DEADLINE:-300}"; else DEADLINE_S="${GPU_CHECK_DEADLINE:-540}"; fi
RESERVE_S=20  # kept for the last kill (10 s) and packing
MIN_STEP_S=15

# step: "budget expected" in seconds (expected: on one H200, 16 cores; see the list at the top)
declare -A PLAN=(
  [env]="30 5" [build]="240 75" [selfcheck]="90 20" [tests_ops]="180 75" [tests_engines]="150 45" [sanitizer_check]="60 20"
  [memcheck]="150 60" [racecheck]="150 45" [bench_aux_head]="90 20" [bench_replay]="150 45"
  [bench_overlap]="180 60" [profile]="60 20" [bench_memory]="60 20" [bench_scaling]="90 40"
  [memcheck_graphs]="120 50"
)

DEST="${OUT:-$ROOT/build/gpu_check}"
mkdir -p "$DEST" || { echo "cannot create $DEST" >&2; exit 2; }
DEST="$(cd "$DEST" && pwd)"
WORK_PARENT="$(mktemp -d "${TMPDIR:-/tmp}/dgl_fast_gpu_check.XXXXXX")"
NAME="gpu_check-$MODE"
WORK="$WORK_PARENT/$NAME"
mkdir -p "$WORK/logs" "$WORK/results" "$WORK/profile"
touch "$WORK/.start"
TARBALL="$DEST/$NAME.tar.gz"
{
  echo "command: bash benchmarks/gpu_check.sh${1:+ $1}"
  echo "mode: $MODE   deadline: ${DEADLINE_S}s   started: $(date -u +%Y-%m-%dT%H:%M:%SZ)   host: ${HOSTNAME:-?}"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no git')"
  git status --short 2>/dev/null | head -50
} > "$WORK/meta.txt"

if [ "$MODE" = dry ]; then
  # the GPU machine has no mlxtend: the dry run hides it, so nothing here may need it
  mkdir -p "$WORK_PARENT/no_mlxtend/mlxtend"
  echo 'raise ModuleNotFoundError("No module named mlxtend (hidden by gpu_check.sh --cpu-dry-run: the GPU machine has none)")' \
    > "$WORK_PARENT/no_mlxtend/mlxtend/__init__.py"
  export PYTHONPATH="$WORK_PARENT/no_mlxtend${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- step bookkeeping -------------------------------------------------------------------------------

S_NAME=(); S_STATUS=(); S_SECS=(); S_BUDGET=(); S_EXPECT=(); S_NOTE=(); S_PID=(); S_T0=(); S_LOG=(); S_RC=()
DEADLINE_SKIPS=0
now() { date +%s; }
elapsed() { echo $(( $(now) - START )); }

new_step() {  # NAME -> index in $IDX (budget and expected time from PLAN, budget from GPU_CHECK_BUDGETS)
  local plan override
  read -r -a plan <<< "${PLAN[$1]}"
  override="$(tr ',' '\n' <<< "${GPU_CHECK_BUDGETS:-}" | grep "^$1=" | tail -1 | cut -d= -f2)"
  [[ "$override" =~ ^[0-9]+$ ]] && plan[0]=$override
  IDX=${#S_NAME[@]}
  S_NAME[IDX]=$1; S_BUDGET[IDX]=${plan[0]}; S_EXPECT[IDX]=${plan[1]}; S_STATUS[IDX]="-"; S_SECS[IDX]=0
  S_NOTE[IDX]=""; S_PID[IDX]=""; S_RC[IDX]=""; S_LOG[IDX]="$WORK/logs/$(printf '%02d' "$IDX")-$1.log"
}

skip_step() {  # NAME NOTE
  new_step "$1"
  S_STATUS[IDX]=SKIP; S_NOTE[IDX]=$2
  echo "[$(printf '%4d' "$(elapsed)")s] $1: SKIP ($2)"
}

start_step() {  # NAME CMD... (in the background; finish_step waits)
  local name=$1
  shift
  new_step "$name"
  local budget=${S_BUDGET[IDX]} expect=${S_EXPECT[IDX]}
  if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]] && [ "$name" != build ]; then
    S_STATUS[IDX]=SKIP; S_NOTE[IDX]="GPU_CHECK_SKIP; "
    echo "[$(printf '%4d' "$(elapsed)")s] $name: SKIP (GPU_CHECK_SKIP)"
    return 1
  fi
  local left=$(( START + DEADLINE_S - RESERVE_S - $(now) ))
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    S_STATUS[IDX]=SKIP; S_NOTE[IDX]="deadline (${left}s left); "; DEADLINE_SKIPS=$((DEADLINE_SKIPS + 1))
    echo "[$(printf '%4d' "$(elapsed)")s] $name: SKIP (deadline: ${left}s left)"
    return 1
  fi
  local t=$budget
  if [ "$left" -lt "$t" ]; then t=$left; S_NOTE[IDX]="budget clipped to ${t}s by the deadline; "; fi
  {
    echo "# step $name: budget ${budget}s (given ${t}s), expected ~${expect}s on the GPU; started at +$(elapsed)s"
    printf '$'; printf ' %q' "$@"; echo
  } > "${S_LOG[IDX]}"
  echo "[$(printf '%4d' "$(elapsed)")s] $name: started (budget ${t}s, expected ~${expect}s)"
  S_T0[IDX]=$(now)
  timeout -k 10 "$t" "$@" >> "${S_LOG[IDX]}" 2>&1 &
  S_PID[IDX]=$!
  return 0
}

finish_step() {  # INDEX: wait for it, set status from the exit code
  local i=$1 rc
  [ -n "${S_PID[i]}" ] || return 0
  wait "${S_PID[i]}"
  rc=$?
  S_PID[i]=""
  S_RC[i]=$rc
  S_SECS[i]=$(( $(now) - S_T0[i] ))
  case $rc in
    0) S_STATUS[i]=ok ;;
    124|137) S_STATUS[i]=TIMEOUT; S_NOTE[i]+="killed after ${S_SECS[i]}s; " ;;
    *) S_STATUS[i]=FAIL; S_NOTE[i]+="exit $rc; " ;;
  esac
  echo "# exit status $rc after ${S_SECS[i]}s" >> "${S_LOG[i]}"
  local note
  note="$(grep -a '^note: ' "${S_LOG[i]}" | tail -1 | cut -c7-)"
  [ -n "$note" ] && S_NOTE[i]+="$note"
  echo "[$(printf '%4d' "$(elapsed)")s] ${S_NAME[i]}: ${S_STATUS[i]} in ${S_SECS[i]}s"
  if [ "${S_STATUS[i]}" != ok ]; then tail -n 15 "${S_LOG[i]}" | sed 's/^/    | /'; fi
  pack
}

run_step() {  # NAME CMD...
  start_step "$@" && finish_step "$IDX"
}

# A lane: steps that run one after another in a background subshell, side by side with the main
# shell's steps. The subshell has its own copy of the step arrays: at its end it writes its steps
# to LANE_FILE (one line each, fields separated by \x1f: a non-blank separator keeps empty fields) and lane_merge appends them to the main shell's.
LANE_PID=""
lane_start() {  # FUNCTION
  local n0=${#S_NAME[@]}
  LANE_FILE="$WORK/.lane-$1"
  (
    LANE=1
    trap 'for i in "${!S_PID[@]}"; do [ -n "${S_PID[i]}" ] && kill -TERM "${S_PID[i]}" 2>/dev/null; done; exit 143' TERM
    "$1"
    for ((i = n0; i < ${#S_NAME[@]}; i++)); do
      printf '%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\n' "${S_NAME[i]}" "${S_STATUS[i]}" "${S_SECS[i]}" "${S_BUDGET[i]}" \
        "${S_EXPECT[i]}" "${S_RC[i]}" "${S_LOG[i]}" "${S_NOTE[i]:-}"
    done > "$LANE_FILE"
    echo "$DEADLINE_SKIPS" > "$LANE_FILE.skips"
  ) &
  LANE_PID=$!
}

lane_merge() {  # wait for the lane and append its steps
  [ -n "$LANE_PID" ] || return 0
  wait "$LANE_PID"
  LANE_PID=""
  local name status secs budget expect rc log note i
  while IFS=$'\x1f' read -r name status secs budget expect rc log note; do
    i=${#S_NAME[@]}
    S_NAME[i]=$name; S_STATUS[i]=$status; S_SECS[i]=$secs; S_BUDGET[i]=$budget; S_EXPECT[i]=$expect
    S_RC[i]=$rc; S_LOG[i]=$log; S_NOTE[i]=$note; S_PID[i]=""
  done < "$LANE_FILE"
  [ -f "$LANE_FILE.skips" ] && DEADLINE_SKIPS=$(cat "$LANE_FILE.skips")
  rm -f "$LANE_FILE" "$LANE_FILE.skips"
  pack
}

summary() {
  local i total
  total=$(elapsed)
  echo "gpu_check summary ($MODE run, ${HOSTNAME:-?}, $(date -u +%Y-%m-%dT%H:%M:%SZ)): ${total}s of a ${DEADLINE_S}s deadline"
  printf '%-16s %-7s %5s %7s %9s  %s\n' step status secs budget expected note
  for i in "${!S_NAME[@]}"; do
    printf '%-16s %-7s %5s %7s %9s  %s\n' "${S_NAME[i]}" "${S_STATUS[i]}" "${S_SECS[i]}" "${S_BUDGET[i]}" \
      "${S_EXPECT[i]}" "${S_NOTE[i]%; }"
  done
  echo "tarball: $TARBALL"
}

pack() {  # copy this run's benchmark results, write the summary, (re)write the tarball
  local f
  [ -n "${LANE:-}" ] && return 0  # a side lane's steps are packed by the main shell once merged
  while IFS= read -r -d '' f; do cp -p "$f" "$WORK/results/" 2>/dev/null; done \
    < <(find "$ROOT/benchmarks/results" -type f -newer "$WORK/.start" -print0 2>/dev/null)
  summary > "$WORK/summary.txt"
  cp "$WORK/summary.txt" "$DEST/summary.txt" 2>/dev/null
  tar -czf "$TARBALL.tmp" --exclude=.start --exclude='.lane-*' -C "$WORK_PARENT" "$NAME" 2>/dev/null && mv -f "$TARBALL.tmp" "$TARBALL"
  if [ -f "$TARBALL" ] && [ "$(stat -c %s "$TARBALL")" -gt 15000000 ]; then  # the device returns files <= 16 MB
    rm -f "$WORK"/profile/*trace*
    tar -czf "$TARBALL.tmp" --exclude=.start --exclude='.lane-*' -C "$WORK_PARENT" "$NAME" 2>/dev/null && mv -f "$TARBALL.tmp" "$TARBALL"
  fi
}

# shellcheck disable=SC2317  # reached through the traps below
on_signal() {
  local sig=$1 i
  trap - TERM INT HUP
  echo "gpu_check: got SIG$sig at +$(elapsed)s: stopping the running step(s), packing what we have"
  [ -n "$LANE_PID" ] && kill -TERM "$LANE_PID" 2>/dev/null
  for i in "${!S_NAME[@]}"; do
    if [ -n "${S_PID[i]}" ]; then
      kill -TERM "${S_PID[i]}" 2>/dev/null  # timeout passes it on to the step's whole process group
      S_STATUS[i]=TIMEOUT; S_SECS[i]=$(( $(now) - S_T0[i] )); S_NOTE[i]+="stopped by SIG$sig from outside; "
    fi
  done
  sleep 2
  pack
  summary
  exit 143
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

junit_note() {  # INDEX JUNIT_XML: counts into the note; in the dry run "all skipped" is a SKIP
  local i=$1 xml=$2 counts
  [ "${S_STATUS[i]}" = SKIP ] && return 0
  counts="$("$PY" - "$xml" <<'EOF' 2>/dev/null
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(n["tests"], n["failures"], n["errors"], n["skipped"])
EOF
)"
  if [ -z "$counts" ]; then S_NOTE[i]+="no junit xml; "; return; fi
  local tests fails errs skips
  read -r tests fails errs skips <<< "$counts"
  local passed=$(( tests - fails - errs - skips ))
  if [ "$MODE" = dry ] && [ "${S_STATUS[i]}" = ok ] && [ "$tests" -gt 0 ] && [ "$skips" -eq "$tests" ]; then
    S_STATUS[i]=SKIP
    S_NOTE[i]+="dry run: the $tests CUDA tests were collected and skipped (no GPU)"
    return
  fi
  [ "${S_RC[i]}" = 5 ] && S_NOTE[i]+="no tests selected; "
  S_NOTE[i]+="$passed passed, $fails failed, $errs errors, $skips skipped of $tests"
}

sanitizer_note() {  # INDEX
  local s
  [ -f "${S_LOG[$1]}" ] || return 0
  s="$(grep -a -o 'ERROR SUMMARY: [0-9]* error[s]*' "${S_LOG[$1]}" | tail -1)"
  [ -n "$s" ] && S_NOTE[$1]+="$s; "
  s="$(grep -a -o 'RACECHECK SUMMARY: .*' "${S_LOG[$1]}" | tail -1)"
  [ -n "$s" ] && S_NOTE[$1]+="$s; "
  s="$(grep -a -c 'MISMATCH\|  ERROR ' "${S_LOG[$1]}")"
  [ "${s:-0}" != 0 ] && S_NOTE[$1]+="$s value/exception reports from gpu_sanitize.py; "
}

echo "gpu_check: $MODE run, deadline ${DEADLINE_S}s, logs in $WORK, tarball $TARBALL"

# --- the commands, shared by both modes (the dry run appends tiny-size options) ----------------------
AUX_ARGS=(--kinds mlp-sr --shapes "128x16,256x8,512x2" --batches 128 --dtypes "fp32,bf16" --no-compile)
REPLAY_ARGS=()
OVERLAP_ARGS=(--cases "vgg13-k4:128:fp32,vgg13-k4:128:bf16,vgg13-k4:512:fp32,aux-study-k6:128:fp32")
MEMORY_ARGS=(--device cuda --batches "128,512" --precisions "fp32,bf16")
SCALING_ARGS=(--device cuda --steps 20 --world 2,4 --gloo-batches 8)
if [ "$MODE" = dry ]; then
  TINY=(--quick --device cpu --no-write)  # --quick checks the size options above, then runs tiny sizes
  SANITIZE=("$PY" benchmarks/gpu_sanitize.py --cpu-dry-run)
  PROFILE=("$PY" benchmarks/gpu_profile.py --cpu-dry-run --out "$WORK/profile/profile_aux_head-cpu.md"
           --trace "$WORK/profile/trace_aux_head-cpu.json")
else
  TINY=()
  SANITIZE=("$PY" benchmarks/gpu_sanitize.py)
  PROFILE=("$PY" benchmarks/gpu_profile.py --trace "$WORK/profile/trace_aux_head.json")
fi

# --- 1. environment ------------------------------------------------------------------------------------
run_step env bash "$SELF" __env
cp "${S_LOG[IDX]}" "$WORK/env.txt" 2>/dev/null
extra="$(grep -a '^note-extra: ' "${S_LOG[IDX]}" 2>/dev/null | tail -1 | cut -c13-)"
[ -n "$extra" ] && S_NOTE[IDX]+="; $extra"

# --- 2. build -----------------------------------------------------------------------------------------
if [ "$MODE" = dry ]; then
  run_step build bash "$SELF" __build dry
  [ "${S_STATUS[IDX]}" = ok ] && S_STATUS[IDX]=SKIP
else
  run_step build bash "$SELF" __build gpu
  if [ "${S_STATUS[IDX]}" != ok ]; then
    echo "gpu_check: STOP: the build failed or CUDA is not usable (see ${S_LOG[IDX]}); the remaining steps are skipped"
    for s in selfcheck tests_ops tests_engines sanitizer_check memcheck racecheck memcheck_graphs bench_aux_head \
             bench_replay bench_overlap profile bench_memory bench_scaling; do
      skip_step "$s" "build failed"
    done
    pack
    summary
    exit 1
  fi
fi

# --- 3. the self-check: every op, graphs, streams, async and a short benchmark, the fastest signal ---
SELFCHECK_JSON="$WORK/results/selfcheck-$([ "$MODE" = dry ] && echo cpu || echo gpu).json"
if [ "$MODE" = dry ]; then
  run_step selfcheck "$PY" -m dgl_fast check --device cpu --bench-seconds 1 --json "$SELFCHECK_JSON"
else
  run_step selfcheck "$PY" -m dgl_fast check --device cuda --bench-seconds 5 --json "$SELFCHECK_JSON"
fi
sc="$(grep -a -E '^[0-9]+ ok, [0-9]+ FAIL, [0-9]+ skipped' "${S_LOG[IDX]}" 2>/dev/null | tail -1)"
[ -n "$sc" ] && S_NOTE[IDX]+="$sc; "
sc="$(grep -a '^self-check FAILED: ' "${S_LOG[IDX]}" 2>/dev/null | tail -1 | cut -c20-)"
[ -n "$sc" ] && S_NOTE[IDX]+="failed: $sc; "

# --- 4-8. side by side: the CUDA tests (ops in one pytest process, everything else in another) and
# the sanitizer lane (check, memcheck, racecheck, memcheck of the graph steps); no step here times anything
OPS_TESTS=(tests/test_aux_pool.py tests/test_linear_bn_relu.py tests/test_bn_update_stats.py tests/test_aux_head.py tests/test_softmax_xent.py
           tests/test_replay_buffer.py tests/test_heads.py)
OTHER_TESTS=()
for f in tests/test_*.py; do
  case " ${OPS_TESTS[*]} tests/test_simt.py " in *" $f "*) ;; *) OTHER_TESTS+=("$f") ;; esac
done
# -v: a step killed by its budget still shows the test it was in; faulthandler dumps every thread's
# stack of a test stuck for 110 s (also inside a CUDA call, where pytest-timeout's signal cannot land)
PYTEST=("$PY" -m pytest -m cuda -v -rfEs --durations=25 -p no:cacheprovider -o faulthandler_timeout=110)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST+=(-p timeout --timeout=120); fi

# compute-sanitizer always with --report-api-errors no (torch's own failing probes are not our errors)
SAN_OPTS=(--report-api-errors no)
sanitizer_lane() {
  local san="" filt="" i_san
  if [ "$MODE" = dry ]; then
    skip_step sanitizer_check "dry run: needs a GPU"
    run_step memcheck "${SANITIZE[@]}" && S_NOTE[IDX]+="dry run: gpu_sanitize.py on the CPU, no compute-sanitizer; "
    sanitizer_note "$IDX"
    skip_step racecheck "dry run: needs a GPU"
    skip_step memcheck_graphs "dry run: needs a GPU"
    return 0
  fi
  run_step sanitizer_check bash "$SELF" __sanitizer_check
  i_san=$IDX
  if [ "${S_RC[i_san]}" = 3 ]; then S_STATUS[i_san]=SKIP; S_NOTE[i_san]="${S_NOTE[i_san]#exit 3; }"; fi
  if [ "${S_STATUS[i_san]}" = ok ]; then san="$(find_sanitizer)"; fi
  if [ -z "$san" ]; then
    local why="compute-sanitizer does not work here (see sanitizer_check)"
    [ "${S_STATUS[i_san]}" = SKIP ] && why="compute-sanitizer refuses this device (see sanitizer_check)"
    skip_step memcheck "$why"; skip_step racecheck "$why"; skip_step memcheck_graphs "$why"
    return 0
  fi
  run_step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --error-exitcode 1 "${SAN_OPTS[@]}" \
    "${SANITIZE[@]}"
  sanitizer_note "$IDX"
  local kfilter=()
  filt="$(grep -a '^kernel filter: ' "${S_LOG[i_san]}" | tail -1 | cut -c16-)"
  if [ -n "$filt" ]; then read -r -a kfilter <<< "$filt"; fi
  run_step racecheck "$san" --tool racecheck --error-exitcode 1 "${SAN_OPTS[@]}" "${kfilter[@]}" "${SANITIZE[@]}"
  sanitizer_note "$IDX"
  [ -n "$filt" ] && S_NOTE[IDX]+="only dgl_fast kernels checked ($filt); "
  # last in the lane: runs only if time is left
  run_step memcheck_graphs "$san" --tool memcheck --error-exitcode 1 "${SAN_OPTS[@]}" "${SANITIZE[@]}" --parts engine,async
  sanitizer_note "$IDX"
}

start_step tests_ops "${PYTEST[@]}" --junitxml="$WORK/logs/junit-tests_ops.xml" "${OPS_TESTS[@]}"
I_OPS=$IDX
start_step tests_engines "${PYTEST[@]}" --junitxml="$WORK/logs/junit-tests_engines.xml" "${OTHER_TESTS[@]}"
I_ENG=$IDX
lane_start sanitizer_lane
finish_step "$I_OPS"; junit_note "$I_OPS" "$WORK/logs/junit-tests_ops.xml"
finish_step "$I_ENG"; junit_note "$I_ENG" "$WORK/logs/junit-tests_engines.xml"
pack
lane_merge

# --- 9-14. benchmarks at the sizes of issue 10's targets, the kernel profile: alone on the device -------
run_step bench_aux_head "$PY" -m dgl_fast bench aux_head "${AUX_ARGS[@]}" "${TINY[@]}"
run_step bench_replay "$PY" -m dgl_fast bench replay_buffer "${REPLAY_ARGS[@]}" "${TINY[@]}"
run_step bench_overlap "$PY" -m dgl_fast bench overlap "${OVERLAP_ARGS[@]}" "${TINY[@]}"
run_step profile "${PROFILE[@]}"
run_step bench_memory "$PY" -m dgl_fast bench memory "${MEMORY_ARGS[@]}" "${TINY[@]}"
run_step bench_scaling "$PY" -m dgl_fast bench scaling "${SCALING_ARGS[@]}" "${TINY[@]}"

# --- pack, summary last, exit status ------------------------------------------------------------------
pack
FAILED=0
for i in "${!S_NAME[@]}"; do
  case "${S_STATUS[i]}" in FAIL|TIMEOUT) FAILED=$((FAILED + 1)) ;; esac
done
# the unpacked logs: beside the tarball when it stays on this machine (no $OUT), else dropped (under
# $OUT every file would travel back, and only the tarball and summary.txt should)
if [ -z "${OUT:-}" ]; then
  rm -rf "${DEST:?}/$NAME" && mv "$WORK" "$DEST/$NAME" && WORK="$DEST/$NAME"
  rm -rf "$WORK_PARENT"
  echo "packed: $TARBALL ($(du -h "$TARBALL" 2>/dev/null | cut -f1)); logs: $WORK"
else
  rm -rf "$WORK_PARENT"
  echo "packed: $TARBALL ($(du -h "$TARBALL" 2>/dev/null | cut -f1))"
fi
RC=0
if [ "$MODE" = dry ]; then
  if [ "$FAILED" -gt 0 ] || [ "$DEADLINE_SKIPS" -gt 0 ]; then
    echo "gpu_check dry run: FAILED: $FAILED step(s) failed, $DEADLINE_SKIPS skipped for the deadline"
    RC=1
  else
    echo "gpu_check dry run: every step that can run on a CPU passed"
  fi
else
  echo "gpu_check: $FAILED step(s) failed or timed out (see the summary and the logs in the tarball)"
fi
echo
summary
exit "$RC"
