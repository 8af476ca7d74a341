// Hand-written CUDA (compiled at run time by NVRTC: nothing built at install time) for the compressed branch's two
// exponential passes, v1.1 shape only (16 query heads per kv head, D = 32, bfloat16): an experiment measuring how
// close mma.sync code, whose HMMAs ptxas interleaves with the exps, gets to the exp unit's ceiling where Triton's
// wgmma kernels stop at 59-76 % (README, issue 4). Variant knobs are macros set by scripts/gpu/nvrtc25.py.
//
// Layout ("keys as M"): S^T = K Q^T per mma.m16n8k16, A = 16 compressed keys x 16 dims from shared memory by
// ldmatrix, B = 16 dims x 8 query heads of one token, held in registers for the whole key loop. A thread's C
// fragment holds keys gid and gid + 8 for heads 2*t4 and 2*t4 + 1 (gid = lane / 4, t4 = lane % 4), so a token's
// head sum (the top-k's score) needs two shuffles per pair of keys, and its row sums (the LSE) three at the end.
//
//   lse_probe: the LSE of every (token, query head) row with the fixed Cauchy-Schwarz shift (scripts/gpu/
//              exp_pass_probe.py's Triton probe, the same work).
//   topk:      with the LSE given, each (token, kv head)'s TOPK best compressed blocks by the sum over its 16 heads of
//              exp(s - lse) (the v1.1 top-k: one compressed block per selection block), best first.
//
// Macros: WARPS (per CTA), TOK (tokens per warp), CK (keys per shared-memory chunk, a multiple of 16), STAGES (chunks
// in flight), MINB (CTAs per SM for __launch_bounds__), POLY_EVERY (0: all exps on MUFU; n: one exp in n as a
// polynomial on the FMA pipe), KT_UNROLL (16-key tiles unrolled in lse_probe), TOPK, SYNTH (lse_probe, timing only:
// 1 makes the key fragments in registers instead of loading them, 2 also replaces the HMMAs by one FFMA per logit).

typedef unsigned short bf16_t;
typedef unsigned int u32;

#define HS 16
#define D 32
#define HQ 32

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ float ex2_mufu(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// 2^x on the FMA pipe: 2^j p(x - j), j = round(x) by the 1.5 * 2^23 add, p a degree-3 fit (d3s2.ops._exp2's "poly")
__device__ __forceinline__ float ex2_poly(float x) {
    x = fmaxf(x, -125.f);
    float t = __fadd_rn(x, 12582912.f);
    float f = __fsub_rn(x, __fsub_rn(t, 12582912.f));
    float p = __fmaf_rn(__fmaf_rn(__fmaf_rn(0.0551716685295105f, f, 0.2426111400127411f), f, 0.6932609677314758f), f,
                        0.9999280571937561f);
    return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}

// `slot` numbers a thread's exps within an unrolled step (a compile-time constant after unrolling)
__device__ __forceinline__ float ex2_sel(float x, int slot) {
#if POLY_EVERY > 0
    if (slot % POLY_EVERY == POLY_EVERY - 1) return ex2_poly(x);
#endif
    return ex2_mufu(x);
}

__device__ __forceinline__ float lg2_approx(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// a key row is 64 bytes = four 16-byte units; unit u of row r sits at u ^ ((r >> 1) & 3): the 8 rows an ldmatrix
// reads then fall on 8 different bank groups
__device__ __forceinline__ u32 unit_offset(int row, int unit) { return row * 64 + ((unit ^ ((row >> 1) & 3)) << 4); }

// chunk `chunk` of the sample's compressed keys of kv head g into shared-memory slot `slot_addr` (zeros past c1)
__device__ __forceinline__ void load_chunk(u32 slot_addr, const bf16_t* kc, int stride_kn, int g, int c0, int c1,
                                           int chunk) {
    for (int i = threadIdx.x; i < CK * 4; i += WARPS * 32) {
        int row = i >> 2, unit = i & 3;
        int key = c0 + chunk * CK + row;
        bool ok = key < c1;
        const bf16_t* src = kc + (long long)(ok ? key : c0) * stride_kn + g * D + unit * 8;
        cp_async16(slot_addr + unit_offset(row, unit), src, ok ? 16 : 0);
    }
}

// B fragments of a token's 16 heads (two n-tiles of 8) for both 16-dim k-steps: q[token, g*16 + nt*8 + gid, ...]
__device__ __forceinline__ void load_q_frags(u32 (&b)[2][2][2], const bf16_t* q, long long tok, int stride_qn, int g,
                                             int gid, int t4) {
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
        for (int ks = 0; ks < 2; ks++) {
            const u32* row = reinterpret_cast<const u32*>(q + tok * stride_qn + (g * HS + nt * 8 + gid) * D + ks * 16);
            b[nt][ks][0] = row[t4];
            b[nt][ks][1] = row[t4 + 4];
        }
}

__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// |q| of head nt*8 + gid (from this lane group's 8 of its 32 dims), then the value for head nt*8 + 2*t4 + j
__device__ __forceinline__ void head_norms(float (&out)[2][2], const u32 (&b)[2][2][2], int t4) {
#pragma unroll
    for (int nt = 0; nt < 2; nt++) {
        float ss = 0.f;
#pragma unroll
        for (int ks = 0; ks < 2; ks++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float lo = bf16_lo(b[nt][ks][r]), hi = bf16_hi(b[nt][ks][r]);
                ss = fmaf(lo, lo, fmaf(hi, hi, ss));
            }
        ss += __shfl_xor_sync(0xffffffffu, ss, 1);
        ss += __shfl_xor_sync(0xffffffffu, ss, 2);
        float nrm = sqrtf(ss);
#pragma unroll
        for (int j = 0; j < 2; j++) out[nt][j] = __shfl_sync(0xffffffffu, nrm, 4 * (2 * t4 + j));
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)
    lse_probe(const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, float* __restrict__ lse,
              const int* __restrict__ cu_seq, const int* __restrict__ cu_cmp, const float* __restrict__ kmax,
              const float* __restrict__ scale_log2_ptr, int stride_qn, int stride_kn) {
    __shared__ __align__(128) unsigned char smem[STAGES * CK * 64];
    const int b = blockIdx.y, g = blockIdx.z;
    const int s0 = cu_seq[b], s1 = cu_seq[b + 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, t4 = lane & 3;
    const int tok0 = s0 + (blockIdx.x * WARPS + warp) * TOK;
    if (s0 + blockIdx.x * WARPS * TOK >= s1) return;
    const int c0 = cu_cmp[b], c1 = cu_cmp[b + 1];
    const int nchunks = (c1 - c0 + CK - 1) / CK;
    const float sl = *scale_log2_ptr;
    const float shift_k = sl * kmax[b * 2 + g];

    u32 bq[TOK][2][2][2];
    float m[TOK][2][2], acc[TOK][2][2];
#pragma unroll
    for (int i = 0; i < TOK; i++) {
        long long tok = min(tok0 + i, s1 - 1);
        load_q_frags(bq[i], q, tok, stride_qn, g, gid, t4);
        head_norms(m[i], bq[i], t4);
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                m[i][nt][j] *= shift_k;
                acc[i][nt][j] = 0.f;
            }
    }
    const u32 smem0 = smem_u32(smem);
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nchunks) load_chunk(smem0 + s * CK * 64, kc, stride_kn, g, c0, c1, s);
        cp_async_commit();
    }
    // this lane's ldmatrix row and 16-byte unit within a 16-key x 16-dim tile (matrix lane / 8)
    const int ld_row = (lane & 7) + ((lane >> 3) & 1) * 8, ld_unit = lane >> 4;
    for (int chunk = 0; chunk < nchunks; chunk++) {
#if SYNTH == 0
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        int next = chunk + STAGES - 1;
        if (next < nchunks) load_chunk(smem0 + (next % STAGES) * CK * 64, kc, stride_kn, g, c0, c1, next);
        cp_async_commit();
        const u32 slot = smem0 + (chunk % STAGES) * CK * 64;
#endif
        const int key_base = c0 + chunk * CK;
        const bool masked = key_base + CK > c1;
#pragma unroll KT_UNROLL
        for (int kt = 0; kt < CK / 16; kt++) {
            u32 a[2][4];
#if SYNTH == 0
#pragma unroll
            for (int ks = 0; ks < 2; ks++) ldsm_x4(a[ks], slot + unit_offset(kt * 16 + ld_row, ks * 2 + ld_unit));
#else
            // timing only: key fragments made in registers (a new pattern per tile), no shared memory, no barrier
            const u32 pattern = (u32)(chunk * CK + kt) * 0x00010001u;
#pragma unroll
            for (int ks = 0; ks < 2; ks++)
#pragma unroll
                for (int r = 0; r < 4; r++) a[ks][r] = (bq[0][r & 1][ks][r >> 1] & 0x3fff3fffu) ^ (pattern & 0x00ff00ffu);
#endif
            float keep0 = 1.f, keep1 = 1.f;
            if (masked) {
                keep0 = key_base + kt * 16 + gid < c1 ? 1.f : 0.f;
                keep1 = key_base + kt * 16 + gid + 8 < c1 ? 1.f : 0.f;
            }
#pragma unroll
            for (int i = 0; i < TOK; i++)
#pragma unroll
                for (int nt = 0; nt < 2; nt++) {
                    float c[4] = {0.f, 0.f, 0.f, 0.f};
#if SYNTH == 2
                    // timing only: logits from one FFMA each instead of the tensor cores
#pragma unroll
                    for (int r = 0; r < 4; r++) c[r] = fmaf(bf16_lo(a[r >> 1][r]), bf16_hi(bq[i][nt][r >> 1][r & 1]), 0.5f);
#else
                    mma_bf16(c, a[0], bq[i][nt][0][0], bq[i][nt][0][1]);
                    mma_bf16(c, a[1], bq[i][nt][1][0], bq[i][nt][1][1]);
#endif
                    const int slot = (i * 2 + nt) * 4;
                    float e0 = ex2_sel(fmaf(c[0], sl, -m[i][nt][0]), slot);
                    float e1 = ex2_sel(fmaf(c[1], sl, -m[i][nt][1]), slot + 1);
                    float e2 = ex2_sel(fmaf(c[2], sl, -m[i][nt][0]), slot + 2);
                    float e3 = ex2_sel(fmaf(c[3], sl, -m[i][nt][1]), slot + 3);
                    if (masked) {
                        acc[i][nt][0] += e0 * keep0 + e2 * keep1;
                        acc[i][nt][1] += e1 * keep0 + e3 * keep1;
                    } else {
                        acc[i][nt][0] += e0 + e2;
                        acc[i][nt][1] += e1 + e3;
                    }
                }
        }
    }
#pragma unroll
    for (int i = 0; i < TOK; i++)
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                float s = acc[i][nt][j];
                s += __shfl_xor_sync(0xffffffffu, s, 4);
                s += __shfl_xor_sync(0xffffffffu, s, 8);
                s += __shfl_xor_sync(0xffffffffu, s, 16);
                if (gid == 0 && tok0 + i < s1)
                    lse[(long long)(tok0 + i) * HQ + g * HS + nt * 8 + 2 * t4 + j] =
                        (m[i][nt][j] + lg2_approx(s)) * 0.6931471805599453f;
            }
}

// ---- top-k ----------------------------------------------------------------------------------------------------

// insert (score, id) into a warp-uniform descending list held by every lane (TOPK registers each)
__device__ __forceinline__ void insert_sorted(float (&best)[TOPK], int (&ids)[TOPK], float score, int id) {
#pragma unroll
    for (int r = TOPK - 1; r >= 0; r--) {
        bool above = r == 0 || best[r - 1] >= score;
        if (best[r] < score) {
            best[r] = above ? score : best[r - 1];
            ids[r] = above ? id : ids[r - 1];
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)
    topk(const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, const float* __restrict__ lse_in,
         int* __restrict__ idx_out, const int* __restrict__ cu_seq, const int* __restrict__ cu_cmp,
         const float* __restrict__ scale_log2_ptr, int stride_qn, int stride_kn) {
    __shared__ __align__(128) unsigned char smem[STAGES * CK * 64];
    const int b = blockIdx.y, g = blockIdx.z;
    const int s0 = cu_seq[b], s1 = cu_seq[b + 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, t4 = lane & 3;
    const int tok0 = s0 + (blockIdx.x * WARPS + warp) * TOK;
    if (s0 + blockIdx.x * WARPS * TOK >= s1) return;
    const int c0 = cu_cmp[b], c1 = cu_cmp[b + 1];
    const int nchunks = (c1 - c0 + CK - 1) / CK;
    const float sl = *scale_log2_ptr;

    u32 bq[TOK][2][2][2];
    float m[TOK][2][2];  // the LSE in log2 units of this lane's heads nt*8 + 2*t4 + j
    float best[TOK][TOPK];
    int ids[TOK][TOPK];
#pragma unroll
    for (int i = 0; i < TOK; i++) {
        long long tok = min(tok0 + i, s1 - 1);
        load_q_frags(bq[i], q, tok, stride_qn, g, gid, t4);
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int j = 0; j < 2; j++) m[i][nt][j] = lse_in[tok * HQ + g * HS + nt * 8 + 2 * t4 + j] * 1.4426950408889634f;
#pragma unroll
        for (int r = 0; r < TOPK; r++) {
            best[i][r] = -1.f;
            ids[i][r] = -1;
        }
    }
    const u32 smem0 = smem_u32(smem);
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < nchunks) load_chunk(smem0 + s * CK * 64, kc, stride_kn, g, c0, c1, s);
        cp_async_commit();
    }
    const int ld_row = (lane & 7) + ((lane >> 3) & 1) * 8, ld_unit = lane >> 4;
    for (int chunk = 0; chunk < nchunks; chunk++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        int next = chunk + STAGES - 1;
        if (next < nchunks) load_chunk(smem0 + (next % STAGES) * CK * 64, kc, stride_kn, g, c0, c1, next);
        cp_async_commit();
        const u32 slot = smem0 + (chunk % STAGES) * CK * 64;
        const int key_base = c0 + chunk * CK;
#pragma unroll 1
        for (int kt = 0; kt < CK / 16; kt++) {
            u32 a[2][4];
#pragma unroll
            for (int ks = 0; ks < 2; ks++) ldsm_x4(a[ks], slot + unit_offset(kt * 16 + ld_row, ks * 2 + ld_unit));
            const int key_a = key_base + kt * 16 + gid, key_b = key_a + 8;
#pragma unroll
            for (int i = 0; i < TOK; i++) {
                float score_a = 0.f, score_b = 0.f;  // this lane's heads' share of keys key_a and key_b
#pragma unroll
                for (int nt = 0; nt < 2; nt++) {
                    float c[4] = {0.f, 0.f, 0.f, 0.f};
                    mma_bf16(c, a[0], bq[i][nt][0][0], bq[i][nt][0][1]);
                    mma_bf16(c, a[1], bq[i][nt][1][0], bq[i][nt][1][1]);
                    const int slot = (i * 2 + nt) * 4;
                    score_a += ex2_sel(fmaf(c[0], sl, -m[i][nt][0]), slot) +
                               ex2_sel(fmaf(c[1], sl, -m[i][nt][1]), slot + 1);
                    score_b += ex2_sel(fmaf(c[2], sl, -m[i][nt][0]), slot + 2) +
                               ex2_sel(fmaf(c[3], sl, -m[i][nt][1]), slot + 3);
                }
                score_a += __shfl_xor_sync(0xffffffffu, score_a, 1);
                score_b += __shfl_xor_sync(0xffffffffu, score_b, 1);
                score_a += __shfl_xor_sync(0xffffffffu, score_a, 2);
                score_b += __shfl_xor_sync(0xffffffffu, score_b, 2);
                if (key_a >= c1) score_a = -1.f;
                if (key_b >= c1) score_b = -1.f;
                // keys that beat the current k-th: rare after the first chunks, so inserted one at a time
                const float kth = best[i][TOPK - 1];
                u32 hits = __ballot_sync(0xffffffffu, t4 == 0 && score_a > kth) |
                           (__ballot_sync(0xffffffffu, t4 == 0 && score_b > kth) << 1);
                while (hits) {
                    int bit = __ffs(hits) - 1;
                    hits &= hits - 1;
                    int src = bit & ~3, second = bit & 1;
                    float sc = __shfl_sync(0xffffffffu, second ? score_b : score_a, src);
                    int id = (src >> 2) + (second ? 8 : 0) + kt * 16 + chunk * CK;
                    if (sc > best[i][TOPK - 1]) insert_sorted(best[i], ids[i], sc, id);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < TOK; i++)
        if (tok0 + i < s1 && lane < TOPK) {
            int v = -1;
#pragma unroll
            for (int r = 0; r < TOPK; r++)
                if (lane == r) v = ids[i][r];
            idx_out[((long long)(tok0 + i) * 2 + g) * TOPK + lane] = v;
        }
}
