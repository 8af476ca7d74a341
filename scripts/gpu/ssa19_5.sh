# Issue 4, session 19, call 5: the GPU tests outside SSA / block attention that run attention (DiT blocks, fused DiT
# blocks, CUDA-graph flow, pipeline residency) on main with the two-warpgroup compressed and window forwards.
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 -m gpu tests/models/dit tests/flow tests/pipeline \
    > $OUT/tests_models.txt 2>&1
tail -4 $OUT/tests_models.txt
el tests
