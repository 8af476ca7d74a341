# Issue 4, session 27: the SSA forward's independent launches side by side on two streams (scripts/gpu/overlap27.py).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/overlap27.py --layouts $L --out $OUT 2>&1 | tail -80
el done
