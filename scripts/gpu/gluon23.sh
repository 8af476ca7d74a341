# Issue 4, session 23: the compressed branch in one exponential pass (Gluon, exps kept in shared memory), checked
# against the Triton compressed forward and top-k and timed beside them (v1.1, N = 134k).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/gluon_fused23.py --layouts $L --out $OUT 2>&1 | grep -v "^\s*$" | tail -60
el done
