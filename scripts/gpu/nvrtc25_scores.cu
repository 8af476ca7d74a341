// Issue 4, session 25: the CUDA probe of nvrtc25.cu (appended to it by nvrtc25.py) extended with the bounded
// top-k scores of one exp pass (scripts/gpu/bounded25.py has the route): per 16-key tile and token, P_j =
// Σ_h e_hj / D_h(t) for its 16 keys (float16), D_h(t) the row's sum before key chunk t (ℓ_h(t − 1); chunk 0 uses
// ℓ_h(0) from a pass over chunk 0 first), and D_h(t) of every chunk plus the final sum, chunk-major. In this
// layout (keys as the mma M dimension) a thread holds 4 heads of its token for 2 keys: the head sum is in-thread,
// then across the quad by a reduce-scatter once per chunk (3·CK/32 shuffles per token), and the chunk totals 12
// shuffles per token per chunk. No P·V: this measures what the scores add to the exp pass. (First version, one
// quad all-reduce and store per 16-key tile: 3.0-3.9 ms against the probe's 1.46-1.53.)

__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// an 8x8 bf16 tile in the mma row fragment (row lane / 4, columns 2·(lane % 4) + 0, 1), transposed in registers
__device__ __forceinline__ u32 transpose8x8(u32 x) {
    u32 y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

#define NV (CK / 8)  // a lane's head-sum partials per token and chunk: two keys per 16-key tile

extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)
    scores_probe(const bf16_t* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
                 bf16_t* __restrict__ o, float* __restrict__ lse,
                 unsigned short* __restrict__ ps, float* __restrict__ dt, const int* __restrict__ cu_seq,
                 const int* __restrict__ cu_cmp, const float* __restrict__ kmax,
                 const float* __restrict__ scale_log2_ptr, int stride_qn, int stride_kn, int nbmax, int n_tokens) {
    __shared__ __align__(128) unsigned char smem[(PV ? 2 : 1) * STAGES * CK * 64];  // K ring, then V ring
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
    float m[TOK][2][2], acc[TOK][2][2], w[TOK][2][2];
#if PV
    // Oᵀ per token: [d-tile 0-15 / 16-31][head tile 0-7 / 8-15] mma accumulators (row d, column head)
    float oacc[TOK][2][2][4];
#pragma unroll
    for (int i = 0; i < TOK; i++)
#pragma unroll
        for (int md = 0; md < 2; md++)
#pragma unroll
            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                for (int r = 0; r < 4; r++) oacc[i][md][nt][r] = 0.f;
    const u32 vring = smem_u32(smem) + STAGES * CK * 64;
    // ldmatrix.trans rows of a 16-key × 16-dim V tile: matrix lane / 8 is keys 8·(mi / 2) + …, dims 8·(mi % 2) + …
    const int lv_row = (lane & 7) + ((lane >> 4) & 1) * 8, lv_unit = (lane >> 3) & 1;
#endif
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
    const int ld_row = (lane & 7) + ((lane >> 3) & 1) * 8, ld_unit = lane >> 4;
    // row totals of this thread's heads over the 8 lane groups (gid), the same in every lane of a quad column
    auto totals = [&](float (&part)[TOK][2][2], float (&out)[TOK][2][2]) {
#pragma unroll
        for (int i = 0; i < TOK; i++)
#pragma unroll
            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    float s = part[i][nt][j];
                    s += __shfl_xor_sync(0xffffffffu, s, 4);
                    s += __shfl_xor_sync(0xffffffffu, s, 8);
                    s += __shfl_xor_sync(0xffffffffu, s, 16);
                    out[i][nt][j] = s;
                }
    };
    auto store_totals = [&](const float (&tot)[TOK][2][2], int slot) {
        if (gid != 0) return;
#pragma unroll
        for (int i = 0; i < TOK; i++)
            if (tok0 + i < s1)
#pragma unroll
                for (int nt = 0; nt < 2; nt++)
#pragma unroll
                    for (int j = 0; j < 2; j++)
                        dt[((long long)slot * n_tokens + tok0 + i) * HQ + g * HS + nt * 8 + 2 * t4 + j] = tot[i][nt][j];
    };
    // every chunk of the ring, with the first chunk done twice: pass 0 only sums it (its ℓ_h(0) normalises its
    // own scores), then chunks 0 … nchunks-1 score and sum
    const int steps = nchunks + 1;
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < steps) {
            load_chunk(smem0 + s * CK * 64, kc, stride_kn, g, c0, c1, s == 0 ? 0 : s - 1);
#if PV
            load_chunk(vring + s * CK * 64, vc, stride_kn, g, c0, c1, s == 0 ? 0 : s - 1);
#endif
        }
        cp_async_commit();
    }
    for (int step = 0; step < steps; step++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        int next = step + STAGES - 1;
        if (next < steps) {
            load_chunk(smem0 + (next % STAGES) * CK * 64, kc, stride_kn, g, c0, c1, next - 1);
#if PV
            load_chunk(vring + (next % STAGES) * CK * 64, vc, stride_kn, g, c0, c1, next - 1);
#endif
        }
        cp_async_commit();
        const u32 slot = smem0 + (step % STAGES) * CK * 64;
        const int chunk = step == 0 ? 0 : step - 1;
        const int key_base = c0 + chunk * CK;
        const bool first = step == 0;
        const bool masked = key_base + CK > c1;
        float part[TOK][2][2];
#pragma unroll
        for (int i = 0; i < TOK; i++)
#pragma unroll
            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                for (int j = 0; j < 2; j++) part[i][nt][j] = 0.f;
        // this lane's share of each tile's head sums: pp[i][2·kt + half], key gid + 8·half of tile kt
        float pp[TOK][NV];
#pragma unroll
        for (int kt = 0; kt < CK / 16; kt++) {
            u32 a[2][4];
#pragma unroll
            for (int ks = 0; ks < 2; ks++) ldsm_x4(a[ks], slot + unit_offset(kt * 16 + ld_row, ks * 2 + ld_unit));
            const int key_a = key_base + kt * 16 + gid, key_b = key_a + 8;
            const float keep_a = key_a < c1 ? 1.f : 0.f, keep_b = key_b < c1 ? 1.f : 0.f;
#if PV
            u32 av[2][4];  // Vᵀ tiles (dims × keys) for the two 16-dim halves
            if (!first) {
                const u32 vslot = vring + (step % STAGES) * CK * 64;
#pragma unroll
                for (int md = 0; md < 2; md++)
                    ldsm_x4_trans(av[md], vslot + unit_offset(kt * 16 + lv_row, md * 2 + lv_unit));
            }
#endif
#pragma unroll
            for (int i = 0; i < TOK; i++) {
                float pa = 0.f, pb = 0.f;
#pragma unroll
                for (int nt = 0; nt < 2; nt++) {
                    float c[4] = {0.f, 0.f, 0.f, 0.f};
                    mma_bf16(c, a[0], bq[i][nt][0][0], bq[i][nt][0][1]);
                    mma_bf16(c, a[1], bq[i][nt][1][0], bq[i][nt][1][1]);
                    float e0 = ex2_mufu(fmaf(c[0], sl, -m[i][nt][0]));
                    float e1 = ex2_mufu(fmaf(c[1], sl, -m[i][nt][1]));
                    float e2 = ex2_mufu(fmaf(c[2], sl, -m[i][nt][0]));
                    float e3 = ex2_mufu(fmaf(c[3], sl, -m[i][nt][1]));
                    if (masked) {  // the last chunk's keys past c1 (zeros in shared memory) count nothing
                        e0 *= keep_a;
                        e1 *= keep_a;
                        e2 *= keep_b;
                        e3 *= keep_b;
                    }
                    part[i][nt][0] += e0 + e2;
                    part[i][nt][1] += e1 + e3;
                    pa = fmaf(e0, w[i][nt][0], fmaf(e1, w[i][nt][1], pa));
                    pb = fmaf(e2, w[i][nt][0], fmaf(e3, w[i][nt][1], pb));
#if PV
                    if (!first) {  // Pᵀ (keys × heads) as the B operand: each 8×8 quarter transposed in registers
                        const u32 b0 = transpose8x8(pack_bf16(e0, e1)), b1 = transpose8x8(pack_bf16(e2, e3));
#pragma unroll
                        for (int md = 0; md < 2; md++) mma_bf16(oacc[i][md][nt], av[md], b0, b1);
                    }
#endif
                }
                pp[i][2 * kt] = pa;
                pp[i][2 * kt + 1] = pb;
            }
        }
        if (!first) {
            // the quad's head sums by reduce-scatter (3·NV/4 shuffles per token instead of NV), then each lane
            // writes NV/4 of the chunk's keys
            const int upper = t4 & 2, odd = t4 & 1;
#pragma unroll
            for (int i = 0; i < TOK; i++) {
                float r1[NV / 2], r2[NV / 4];
#pragma unroll
                for (int v = 0; v < NV / 2; v++) {
                    float send = upper ? pp[i][v] : pp[i][v + NV / 2];
                    float keep = upper ? pp[i][v + NV / 2] : pp[i][v];
                    r1[v] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
                }
#pragma unroll
                for (int v = 0; v < NV / 4; v++) {
                    float send = odd ? r1[v] : r1[v + NV / 4];
                    float keep = odd ? r1[v + NV / 4] : r1[v];
                    r2[v] = keep + __shfl_xor_sync(0xffffffffu, send, 1);
                }
                if (tok0 + i < s1) {
#pragma unroll
                    for (int v = 0; v < NV / 4; v++) {
                        const int idx = (upper ? NV / 2 : 0) + (odd ? NV / 4 : 0) + v;
                        const int key = key_base + (idx >> 1) * 16 + gid + 8 * (idx & 1);
                        if (key < c1) {
                            unsigned short h;
                            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(r2[v]));
                            ps[((long long)(tok0 + i) * 2 + g) * nbmax + key - c0] = h;
                        }
                    }
                }
            }
        }
        if (first) {  // ℓ_h(0): chunk 0's own normaliser
            float tot[TOK][2][2];
            totals(part, tot);
#pragma unroll
            for (int i = 0; i < TOK; i++)
#pragma unroll
                for (int nt = 0; nt < 2; nt++)
#pragma unroll
                    for (int j = 0; j < 2; j++) w[i][nt][j] = 1.f / tot[i][nt][j];
            store_totals(tot, 0);
        } else {
            float tot[TOK][2][2];
#pragma unroll
            for (int i = 0; i < TOK; i++)
#pragma unroll
                for (int nt = 0; nt < 2; nt++)
#pragma unroll
                    for (int j = 0; j < 2; j++) acc[i][nt][j] += part[i][nt][j];
            totals(acc, tot);  // ℓ_h(chunk): the next chunk's normaliser; after the last chunk the row sum
#pragma unroll
            for (int i = 0; i < TOK; i++)
#pragma unroll
                for (int nt = 0; nt < 2; nt++)
#pragma unroll
                    for (int j = 0; j < 2; j++) w[i][nt][j] = 1.f / tot[i][nt][j];
            store_totals(tot, chunk + 1);
            if (chunk == nchunks - 1 && gid == 0) {
#pragma unroll
                for (int i = 0; i < TOK; i++)
                    if (tok0 + i < s1)
#pragma unroll
                        for (int nt = 0; nt < 2; nt++)
#pragma unroll
                            for (int j = 0; j < 2; j++)
                                lse[(long long)(tok0 + i) * HQ + g * HS + nt * 8 + 2 * t4 + j] =
                                    (m[i][nt][j] + lg2_approx(tot[i][nt][j])) * 0.6931471805599453f;
            }
#if PV
            if (chunk == nchunks - 1) {  // o = Oᵀ / ℓ(T): this lane holds dims gid (+8, +16) of heads 2·t4 + j
#pragma unroll
                for (int i = 0; i < TOK; i++)
                    if (tok0 + i < s1)
#pragma unroll
                        for (int md = 0; md < 2; md++)
#pragma unroll
                            for (int nt = 0; nt < 2; nt++)
#pragma unroll
                                for (int r = 0; r < 4; r++) {
                                    const int head = g * HS + nt * 8 + 2 * t4 + (r & 1), d = md * 16 + gid + 8 * (r >> 1);
                                    const float val = oacc[i][md][nt][r] / tot[i][nt][r & 1];
                                    unsigned short h;
                                    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(val));
                                    o[(long long)(tok0 + i) * stride_qn + head * D + d] = h;
                                }
            }
#endif
        }
    }
}
