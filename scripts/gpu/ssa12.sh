# Issue 4, session 12, call 1: the selection forward's tiles launched in list order vs query order (same tiles,
# tile-table path; scripts/gpu/ssa_tile_order.py).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_tile_order.py --layouts $L 2>&1 | grep -v Warn | tee $OUT/tile_order.md
el tile order
