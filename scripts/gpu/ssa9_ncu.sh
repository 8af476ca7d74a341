# Issue 4, session 9: Nsight Compute on the four hot kernels of the v1.1 SSA forward at N = 131072 (full set:
# throughput, warp stall reasons, occupancy, per-instruction samples), to find what bounds each.
source scripts/gpu/_prelude.sh
ncu --version | tail -1
K='regex:_cmp_fwd_kernel|_cmp_topk_dot_kernel|block_attn_fwd_kernel|block_attn_combine_kernel'
ncu --clock-control none --profile-from-start off -k "$K" --set full --import-source no \
    -o $OUT/ssa9 -f python3 scripts/gpu/ssa9_ncu_driver.py $L 2>&1 | tail -15
el profiled
ncu -i $OUT/ssa9.ncu-rep --page details --csv > $OUT/details.csv
ncu -i $OUT/ssa9.ncu-rep --page source --csv --print-source sass > $OUT/source_sass.csv 2>&1
ls -la $OUT; el done
