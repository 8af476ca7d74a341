# Issue 4, session 17, call 7: call 6's failures were all in tests/ops/block_attn (no file of it changed since
# session 16's passing run), each worker failing every test after its first failure, with 8 workers: the
# block-attention tests alone with 4 workers as in session 16, with the failures' messages.
source scripts/gpu/_prelude.sh
timeout 450 python3 -m pytest -v -p no:cacheprovider -n 4 --timeout 400 --tb=short -rf tests/ops/block_attn \
    > $OUT/tests.txt 2>&1
grep -E "^FAILED|^E  |passed|failed" $OUT/tests.txt | head -40
el tests
