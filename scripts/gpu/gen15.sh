# Session 15, call 8: end-to-end image → mesh with the session's block-attention changes (the selection's "first"
# shift, the fewer-launch plan, the epilogues) inside the CUDA-graph sampling loop: bench_generate.py at 512³ and
# 1024³, full-size random-weight v1.1 models (the session-3 command), against generate_NVIDIA_H200.md's session-3 row.
source scripts/gpu/_prelude.sh
timeout 400 python3 benchmarks/bench_generate.py --layouts $L --resolutions 512 1024 --repeats 2 --out-dir $OUT 2>&1 \
    | grep -v Warn | tail -25
el generate
