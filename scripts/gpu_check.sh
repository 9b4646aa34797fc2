#!/usr/bin/env bash
# Issue 20's device checks, prepared to run in one call of the device machine (about 8 minutes),
# stage by stage, each under its own time limit, so a broken stage costs only its own time:
#
#   bash scripts/device_wheels.sh                       # here, once: .device/wheels (git-ignored)
#   run(command="bash scripts/gpu_check.sh", carry=[".device"], timeout_s=540)
#   run(command="bash scripts/gpu_check.sh md train", carry=[".device"])   # a rerun of some stages
#   run(command="bash scripts/gpu_check.sh install replicas", carry=[".device"])   # not in the default
#
# Stages (default: all but replicas, mace, replicas-mixed and al-compilation):
#   install   the carried wheels the image lacks (only those; never over the image's own)
#   startup   scripts/benchmark_startup.py at 4000 atoms: cold with the default XLA flags (filling
#             a compilation cache), warm from that cache, and cold with GPU autotuning off
#   md        scripts/benchmark_md.py, mlip-md and mlip-md-small at 4000, 32000 and 108000 atoms
#   train     mlip train configs/quickstart.yaml for 40 s: epochs and structures per second
#   replicas  scripts/benchmark_replicas.py: 1, 6, 24 and 96 butane trajectories one by one and together
#   mace      mace-ase (mace-torch, same architecture) on the GPU at 4000 and 32000 atoms
#   replicas-mixed  scripts/benchmark_replicas.py --mixed: the cuau-surfaces exploration, a program
#             per seed size against one padded program (the CPU keeps one per size)
#   al-compilation  scripts/benchmark_al_compilation.py: compilation in three active-learning
#             iterations (the programs of iteration 0 reused by the later models)
# Results: $OUT/results.json (every stage's JSON, merged), $OUT/log.txt (all logs),
# $OUT/benchmark_md.png; $OUT defaults to /tmp/gpu_check_out off the device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
WORK=/tmp/gpu_check
mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES=${*:-install startup md train}
LOG="$OUT/log.txt"
: > "$LOG"

stage() {  # stage NAME LIMIT_S COMMAND...: run under a time limit, log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >> "$WORK/stages.jsonl"
  echo "== $name: rc $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
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
      stage install 60 install_wheels
      stage device 30 bash -c "nvidia-smi -L; $PY -c 'import jax; print(jax.__version__, jax.devices())'" ;;
    startup)
      stage startup_cold 150 "$PY" scripts/benchmark_startup.py --atoms 4000 --cache "$WORK/cache" \
        --json "$WORK/startup_cold.json"
      stage startup_warm 45 "$PY" scripts/benchmark_startup.py --atoms 4000 --cache "$WORK/cache" \
        --json "$WORK/startup_warm.json"
      stage startup_no_autotune 100 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
        "$PY" scripts/benchmark_startup.py --atoms 4000 --cache off --json "$WORK/startup_no_autotune.json" ;;
    md)
      stage md 130 "$PY" scripts/benchmark_md.py --paths mlip-md,mlip-md-small --sizes 4000 32000 108000 \
        --min-seconds 3 --max-steps 1000 --case-timeout-s 60 --no-docs --work-dir "$WORK/md" \
        --device-note "gpu_check.sh" ;;
    train)
      stage train 75 "$PY" -m mlip.cli train configs/quickstart.yaml --set run_dir="$WORK/train" \
        --set training.max_time=40 --set training.progress_bar=false --set training.plots=false ;;
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

"$PY" - "$WORK" "$OUT" <<'EOF'
import csv, glob, json, os, shutil, sys
work, out = sys.argv[1:3]
results = {"stages": [json.loads(line) for line in open(os.path.join(work, "stages.jsonl"))]
           if os.path.exists(os.path.join(work, "stages.jsonl")) else []}
for path in sorted(glob.glob(os.path.join(work, "startup_*.json"))):
    results[os.path.basename(path)[:-5]] = json.load(open(path))
for name in ("replicas", "replicas_mixed", "al_compilation"):
    if os.path.exists(os.path.join(work, f"{name}.json")):
        results[name] = json.load(open(os.path.join(work, f"{name}.json")))
for name in ("md", "mace"):
    path = os.path.join(work, name, "benchmark_md.json")
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
with open(os.path.join(out, "results.json"), "w") as stream:
    json.dump(results, stream, indent=1)
print(json.dumps({k: v for k, v in results.items() if k not in ("md", "mace", "replicas", "replicas_mixed",
                                                                "al_compilation")}, indent=1))
EOF
