#!/usr/bin/env bash
# Issue 20's device checks, prepared to run in two calls of the device machine (15 minutes of
# device time a session, starts included), stage by stage, each under its own time limit, so a
# broken stage costs only its own time:
#
#   bash scripts/device_wheels.sh                       # here, once: .device/wheels (git-ignored)
#   python scripts/benchmark_md.py --paths mlip-md-small --sizes 108 --max-steps 20 --no-docs \
#       --work-dir .device/md                           # here, once: the small model's run dir
#   run(command="PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh", carry=[".device"], timeout_s=560)
#   run(command="PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh profile overlap", carry=[".device"],
#       timeout_s=330)         # at once, while the machine is warm (30 s): it keeps the install
#   run(command="bash scripts/gpu_check.sh install drift train fits mace", carry=[".device"])   # later
#
# Every stage needs the install stage first on a fresh machine (a warm one keeps it). A command
# the device kills at its limit still returns $OUT: results.json is merged after each stage.
#
# Stages (default: install startup md; about 6 minutes on the H200):
#   install   the carried wheels the image lacks (only those; never over the image's own)
#   startup   scripts/benchmark_startup.py at 4000 atoms (MD start, then the calculator's first
#             call): cold as mlip starts (XLA's GPU autotuning off; filling a compilation cache),
#             then warm from the cache
#   autotuned the same cold start with XLA's autotuning (MLIP_GPU_AUTOTUNE=1), up to 300 s: do
#             autotuned kernels step faster?
#   md        scripts/benchmark_md.py: mlip-md at 4000, 32000, 62500 atoms; mlip-md-small at
#             4000, 32000, 108000, 256000 (the small model's run dir carried in .device/md)
#   profile   scripts/profile_md.py: a step's device time per module of the model, forward and
#             backward (the default model at 32000 atoms, the small one at 108000)
#   overlap   mlip-md-small at 256000 atoms with neighbour lists built on a host thread (on) and
#             without (off): the device's wait for host lists
#   drift     float32 NVE drift: mlip-md-small and mlip-md at 4000 atoms, 15 s of steps each
#   fits      the largest cells: mlip-md-small at 500000 and 1048576 atoms, mlip-md at 78732
#   train     mlip train configs/quickstart.yaml for 60 s: epochs, structures per second after compilation
#   replicas  scripts/benchmark_replicas.py: 1, 6, 24 and 96 butane trajectories one by one and together
#   mace      mace-ase (mace-torch, same architecture) on the GPU at 4000 and 32000 atoms
#   replicas-mixed  scripts/benchmark_replicas.py --mixed: the cuau-surfaces exploration, a program
#             per seed size against one padded program (the CPU keeps one per size)
#   al-compilation  scripts/benchmark_al_compilation.py: compilation in three active-learning
#             iterations (the programs of iteration 0 reused by the later models)
# Results: $OUT/results.json (every stage's JSON, merged), $OUT/log.txt (all logs, and the
# last lines of each MD case's log), $OUT/benchmark_*.png; $OUT defaults to /tmp/gpu_check_out off the device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
WORK=/tmp/gpu_check
mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES=${*:-install startup md}
# Sizes, overridable for a smoke test off the device, e.g.
#   STARTUP_ATOMS=500 SIZES_DEFAULT=108 SIZES_SMALL="108 500" bash scripts/gpu_check.sh startup md
STARTUP_ATOMS=${STARTUP_ATOMS:-4000}
SIZES_DEFAULT=${SIZES_DEFAULT:-4000 32000 62500}
SIZES_SMALL=${SIZES_SMALL:-4000 32000 108000 256000}
LOG="$OUT/log.txt"
: > "$LOG"

merge_results() {  # $OUT/results.json from what the stages wrote so far (after each stage)
  "$PY" - "$WORK" "$OUT" "$@" <<'EOF'
import csv, glob, json, os, shutil, sys
work, out = sys.argv[1:3]
results = {"stages": [json.loads(line) for line in open(os.path.join(work, "stages.jsonl"))]
           if os.path.exists(os.path.join(work, "stages.jsonl")) else []}
for path in sorted(glob.glob(os.path.join(work, "startup_*.json"))):
    results[os.path.basename(path)[:-5]] = json.load(open(path))
for name in ("replicas", "replicas_mixed", "al_compilation", "profile_default", "profile_small"):
    if os.path.exists(os.path.join(work, f"{name}.json")):
        results[name] = json.load(open(os.path.join(work, f"{name}.json")))
for name in ("md_default", "md_small", "overlap_off", "overlap_on", "drift", "fits_small", "fits_default", "mace"):
    path = os.path.join(work, name, "benchmark_md.json")
    if not os.path.exists(path) and os.path.exists(os.path.join(work, name, "partial.json")):
        results[name] = json.load(open(os.path.join(work, name, "partial.json")))
    if os.path.exists(path):
        results[name] = json.load(open(path))
        if os.path.exists(path[:-4] + "png"):
            shutil.copy(path[:-4] + "png", os.path.join(out, f"benchmark_{name}.png"))
metrics = os.path.join(work, "train", "metrics.csv")
if os.path.exists(metrics):
    rows = list(csv.DictReader(open(metrics)))
    if rows:
        epochs, seconds = int(rows[-1]["epoch"]), float(rows[-1]["time_s"])
        results["train"] = {"epochs": epochs, "seconds": seconds, "first_epoch_s": float(rows[0]["time_s"]),
                            "structures_per_s": round(epochs * 400 / seconds, 1)}
        if len(rows) >= 3:  # after the first epoch (compilation) and its validation
            steady = (float(rows[-1]["time_s"]) - float(rows[1]["time_s"])) / (len(rows) - 2)
            results["train"].update(epoch_s_after_compilation=round(steady, 2),
                                    structures_per_s_after_compilation=round(400 / steady, 1))
partial = os.path.join(out, f"results.json.{os.getpid()}")  # the startup stages merge side by side
with open(partial, "w") as stream:
    json.dump(results, stream, indent=1)
os.replace(partial, os.path.join(out, "results.json"))
if sys.argv[3:] != ["--print"]:
    sys.exit(0)
for name in ("md_default", "md_small", "overlap_off", "overlap_on", "drift", "fits_small", "fits_default", "mace"):  # one line per case
    for row in results.get(name, {}).get("results", []):
        print(name, row["path"], row["n_atoms"], row.get("us_per_atom_step"), row.get("warmup_s"),
              row.get("device_peak_GB"), row.get("neighbour_list_builds"), row.get("neighbour_wait_s"),
              row.get("steps"), row.get("energy_drift_eV_per_atom_ps"), row["status"], row.get("reason", "")[:200])
for name in ("profile_default", "profile_small"):  # the modules that take the most device time
    for row in results.get(name, {}).get("modules", [])[:8]:
        print(name, row["direction"], row["module"], row["ms_per_step"], row["share"])
short = {k: v for k, v in results.items() if k.startswith("startup") or k in ("stages", "train")}
for report in short.values():  # the per-program detail stays in results.json
    for phase in report.values() if isinstance(report, dict) else ():
        if isinstance(phase, dict):
            phase.pop("slowest", None)
print(json.dumps(short))
EOF
}

stage() {  # stage NAME LIMIT_S COMMAND...: run under a time limit, log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >> "$WORK/stages.jsonl"
  echo "== $name: rc $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
  merge_results
}

install_wheels() {
  "$PY" - <<'EOF'
import glob, importlib.metadata as metadata, os, shutil, site, subprocess, sys
missing = []
for wheel in sorted(glob.glob(".device/wheels/*.whl")):
    name = os.path.basename(wheel).split("-")[0].replace("_", "-")
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(wheel)
print("installing:", [os.path.basename(w) for w in missing], flush=True)
if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *missing], check=True)
try:
    import hostlist  # noqa: F401
except ImportError:
    if os.path.exists(".device/wheels/hostlist.py"):
        shutil.copy(".device/wheels/hostlist.py", site.getsitepackages()[0])
EOF
}

for name in $STAGES; do
  case $name in
    install)
      install_wheels >> "$LOG" 2>&1; echo "== install: rc $?" | tee -a "$LOG"
      stage device 30 bash -c "nvidia-smi -L; $PY -c 'import jax; print(jax.__version__, jax.devices())'" ;;
    startup)
      # Cold as mlip starts by default (XLA's GPU autotuning off), filling a cache; then warm from it.
      stage startup_cold 100 "$PY" scripts/benchmark_startup.py --atoms "$STARTUP_ATOMS" --cache "$WORK/cache" \
        --json "$WORK/startup_cold.json"
      stage startup_warm 45 "$PY" scripts/benchmark_startup.py --atoms "$STARTUP_ATOMS" --cache "$WORK/cache" \
        --json "$WORK/startup_warm.json" ;;
    autotuned)
      # With XLA's autotuning (MLIP_GPU_AUTOTUNE=1): over 150 s to the first block on 2026-11-30;
      # does it step faster once compiled? The second block's time against startup_cold's.
      stage startup_autotuned 300 env MLIP_GPU_AUTOTUNE=1 "$PY" scripts/benchmark_startup.py \
        --atoms "$STARTUP_ATOMS" --cache off --json "$WORK/startup_autotuned.json" ;;
    md)
      # The small model's metal run dir, trained on the CPU beforehand (benchmark_md.py caches it
      # by name in its work dir), so the GPU spends no time training it:
      #   python scripts/benchmark_md.py --paths mlip-md-small --sizes 108 --max-steps 20 --no-docs --work-dir .device/md
      mkdir -p "$WORK/md_small"
      cp -r .device/md/mlip_small_metal_* "$WORK/md_small/" 2>/dev/null
      export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
      stage md_default 200 "$PY" scripts/benchmark_md.py --paths mlip-md --sizes $SIZES_DEFAULT \
        --min-seconds 2 --max-steps 500 --block-steps 10 --case-timeout-s 60 --no-docs \
        --work-dir "$WORK/md_default" --device-note "gpu_check.sh"
      stage md_small 150 "$PY" scripts/benchmark_md.py --paths mlip-md-small --sizes $SIZES_SMALL \
        --min-seconds 2 --max-steps 1000 --block-steps 10 --case-timeout-s 60 --no-docs \
        --work-dir "$WORK/md_small" --device-note "gpu_check.sh" ;;
    drift)
      # Float32 NVE drift on the GPU: a few thousand steps of each model at 4000 atoms.
      mkdir -p "$WORK/drift"
      cp -r .device/md/mlip_small_metal_* "$WORK/drift/" 2>/dev/null
      stage drift 150 "$PY" scripts/benchmark_md.py --paths mlip-md-small,mlip-md --sizes 4000 --min-seconds 15 \
        --max-steps 5000 --block-steps 50 --case-timeout-s 70 --no-docs --work-dir "$WORK/drift" \
        --device-note "gpu_check.sh" ;;
    profile)
      # Where a step's device time goes, per module of the model, forward and backward.
      stage profile_default 120 "$PY" scripts/profile_md.py --model default --atoms "${PROFILE_ATOMS_DEFAULT:-32000}" --json "$WORK/profile_default.json"
      stage profile_small 90 "$PY" scripts/profile_md.py --model small --atoms "${PROFILE_ATOMS_SMALL:-108000}" --json "$WORK/profile_small.json" ;;
    overlap)
      # Neighbour lists built on a host thread while the device steps, against the device waiting
      # for each: the small model at 256,000 atoms, where a host list takes seconds.
      for mode in off on; do
        mkdir -p "$WORK/overlap_$mode"
        cp -r .device/md/mlip_small_metal_* "$WORK/overlap_$mode/" 2>/dev/null
        stage overlap_$mode 100 "$PY" scripts/benchmark_md.py --paths mlip-md-small --sizes ${OVERLAP_SIZE:-256000} \
          --min-seconds 15 --max-steps 3000 --block-steps 10 --case-timeout-s 90 --overlap $mode --no-docs \
          --work-dir "$WORK/overlap_$mode" --device-note "gpu_check.sh"
      done ;;
    fits)
      # The largest cells: the small model to a million atoms, the default model past 62,500.
      mkdir -p "$WORK/fits_small"
      cp -r .device/md/mlip_small_metal_* "$WORK/fits_small/" 2>/dev/null
      export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
      stage fits_small 200 "$PY" scripts/benchmark_md.py --paths mlip-md-small --sizes 500000 1048576 \
        --min-seconds 1 --max-steps 50 --block-steps 5 --case-timeout-s 100 --no-docs \
        --work-dir "$WORK/fits_small" --device-note "gpu_check.sh"
      stage fits_default 120 "$PY" scripts/benchmark_md.py --paths mlip-md --sizes 78732 \
        --min-seconds 1 --max-steps 20 --block-steps 5 --case-timeout-s 100 --no-docs \
        --work-dir "$WORK/fits_default" --device-note "gpu_check.sh" ;;
    train)
      stage train 100 "$PY" -m mlip.cli train configs/quickstart.yaml --set run_dir="$WORK/train" \
        --set training.max_time=60 --set training.progress_bar=false --set training.plots=false ;;
    replicas)
      stage replicas 150 "$PY" scripts/benchmark_replicas.py --replicas 1 6 24 96 --epochs 20 \
        --work-dir "$WORK/replicas" --out-json "$WORK/replicas.json" ;;
    replicas-mixed)
      stage replicas_mixed 240 "$PY" scripts/benchmark_replicas.py --mixed --repeats 1 --epochs 20 \
        --work-dir "$WORK/replicas_mixed" --out-json "$WORK/replicas.json" ;;  # writes replicas_mixed.json
    al-compilation)
      stage al_compilation 300 "$PY" scripts/benchmark_al_compilation.py --label gpu \
        --json "$WORK/al_compilation.json" ;;
    mace)
      mkdir -p "$WORK/peers/mace-venv/bin"
      ln -sf "$(command -v "$PY")" "$WORK/peers/mace-venv/bin/python"
      stage mace 150 "$PY" scripts/benchmark_md.py --paths mace-ase --sizes 4000 32000 --min-seconds 3 \
        --max-steps 200 --case-timeout-s 60 --mace-device cuda --peer-dir "$WORK/peers" --no-docs \
        --work-dir "$WORK/mace" ;;
    *) echo "unknown stage $name" | tee -a "$LOG" ;;
  esac
done

for case_log in "$WORK"/md_*/*.log "$WORK"/fits_*/*.log "$WORK"/mace/*.log; do  # each case's last lines
  [ -f "$case_log" ] && { echo "== tail of $case_log"; tail -n 8 "$case_log"; } >> "$LOG"
done
merge_results --print
