/* Weight-only int8 linear layer (CPU): y = (x @ W^T) * scale + bias.
 *
 * W is int8 [N, K] (row-major, one symmetric scale per output channel), x and y float32
 * [M, K] and [M, N]: activations stay float32, each weight is widened to float32 in
 * registers and multiplied in float32, so the result differs from x @ (W * scale)^T only
 * by the order of float32 additions. A decode step at batch 1 reads each weight once, so
 * reading 1 byte instead of 4 per weight is what makes it faster than a float32 GEMV.
 *
 * Layout: W is packed once at load (native.pack_int8) in tiles of 4 output channels, each
 * tile ceil(K / 16) blocks of [4 channels][16 columns] = one 64-byte line, so a tile is one
 * sequential stream (plus a software prefetch PREFETCH bytes ahead). Work is split by tiles
 * across `threads` OpenMP threads (static schedule: each thread streams a contiguous run of
 * W); within a tile, x is taken 4 rows at a time, so the tile's weights come from memory
 * once and from L1 for the other rows. With AVX-512 (BW, VL): 16 weights per instruction
 * (sign-extend, convert, FMA), the last partial block by a masked load of x (the weights
 * are zero-padded); otherwise plain loops the compiler vectorises. Each row's sums run in
 * the same order whatever the other rows, so batched and batch-1 results are identical.
 *
 * Measured (2 shared cores, weights streamed from DRAM, vs the engine's float32 layer,
 * oneDNN-packed): 1 row 4.5-5.7x faster (5632x768, 768x2816, 10240x2048 at 3.5-4x), 8 rows
 * 1.8-2.9x, 32 rows 1.2-1.3x, 64 rows 1.05-1.2x, 256 rows 0.7-0.9x (the caller de-quantises
 * above INT8_KERNEL_ROWS, see linear.py). The same loops on row-major int8 W (4 separate
 * row streams) read only ~28 GB/s, 2.3x a float32 layer at 1 row; in L1/L2 the kernel does
 * ~54 G weights/s per core, so it is bound by the memory stream, not by the conversions.
 *
 * Built and loaded at run time by native.py, like the attention kernels.
 */
#include <stdint.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define AGORA_INT8_AVX512 1
#endif

#define NR 4 /* output channels per tile */
#define MR 4 /* rows of x per pass */
#ifndef PREFETCH
#define PREFETCH 2048 /* bytes ahead (measured: 0, 512, 2048, 4096; 2048-4096 best) */
#endif

/* A tile's weights, packed (see `agora_int8_linear`): 16-column blocks, each holding its 4
 * channels' 16 weights one after another, i.e. one 64-byte line per block, read in order. */
#if defined(AGORA_INT8_AVX512)
static inline __attribute__((always_inline)) __m512 widen(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* out[i][j] = x[i] . w[channel j] for i < rows (a compile-time constant once inlined) */
static inline __attribute__((always_inline)) void tile(const float *restrict x, int64_t ldx,
                                                       const int8_t *restrict w, int64_t K, const int rows,
                                                       float out[MR][NR]) {
    __m512 acc[MR][NR];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16, w += 16 * NR) {
        _mm_prefetch((const char *)(w + PREFETCH), _MM_HINT_T0);
        __m512 wv[NR];
        for (int j = 0; j < NR; j++) wv[j] = widen(w + 16 * j);
        /* the last block of a K that is not a multiple of 16: weights are zero-padded, x
         * is read masked */
        __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        for (int i = 0; i < rows; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + i * ldx + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < NR; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}
#else
static inline void tile(const float *restrict x, int64_t ldx, const int8_t *restrict w, int64_t K, const int rows,
                        float out[MR][NR]) {
    float acc[MR][NR][16] = {{{0}}};
    for (int64_t k = 0; k < K; k += 16, w += 16 * NR) {
        const int n = K - k >= 16 ? 16 : (int)(K - k);
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < NR; j++) {
                const float *xr = x + i * ldx + k;
                #pragma omp simd
                for (int l = 0; l < n; l++) acc[i][j][l] += xr[l] * (float)w[16 * j + l];
            }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < NR; j++) {
            float s = 0.0f;
            for (int l = 0; l < 16; l++) s += acc[i][j][l];
            out[i][j] = s;
        }
}
#endif

/* x [M, K] float32, scale [N] float32, bias [N] float32 or NULL, y [M, N] float32 (all
 * contiguous); w int8, packed: tile t (channels 4t..4t+3; missing ones at the end of N are
 * zero rows) is ceil(K / 16) blocks of [4 channels][16 columns] (columns past K are zero),
 * tile after tile: w_packed[t][b][j][l] = W[4t + j][16b + l]. Returns 0. */
int agora_int8_linear(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int64_t M,
                      int64_t N, int64_t K, int threads) {
    const int64_t tiles = (N + NR - 1) / NR, tile_bytes = (K + 15) / 16 * 16 * NR;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * NR;
        const int nn = N - n0 < NR ? (int)(N - n0) : NR;
        const int8_t *wt = w + t * tile_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            float out[MR][NR];
            const float *xr = x + m0 * K;
            const int rows = M - m0 < MR ? (int)(M - m0) : MR;
            switch (rows) {
                case 1: tile(xr, K, wt, K, 1, out); break;
                case 2: tile(xr, K, wt, K, 2, out); break;
                case 3: tile(xr, K, wt, K, 3, out); break;
                default: tile(xr, K, wt, K, 4, out); break;
            }
            for (int i = 0; i < rows; i++) {
                float *yr = y + (m0 + i) * N + n0;
                for (int j = 0; j < nn; j++) yr[j] = out[i][j] * scale[n0 + j] + (bias ? bias[n0 + j] : 0.0f);
            }
        }
    }
    return 0;
}

/* Output channels [n0, n1) of the packed W (n0 a multiple of 4), de-quantised into
 * out [n1 - n0, K] float32 row-major: out[n - n0][k] = W[n][k] * scale[n]. For the many-row
 * path (linear.py): a block of channels small enough to stay in L2 is de-quantised, then a
 * float32 GEMM multiplies it by all rows, so the weights come from memory as int8 once per
 * call and no float32 copy of the whole layer is ever held. Returns 0. */
int agora_int8_dequant(const int8_t *w, const float *scale, float *out, int64_t N, int64_t K, int64_t n0,
                       int64_t n1, int threads) {
    const int64_t tile_bytes = (K + 15) / 16 * 16 * NR, blocks = (K + 15) / 16;
    if (n1 > N) n1 = N;
    const int64_t t0 = n0 / NR, t1 = (n1 + NR - 1) / NR;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && (t1 - t0) * tile_bytes > 65536)
    for (int64_t t = t0; t < t1; t++) {
        const int8_t *wt = w + t * tile_bytes;
        for (int j = 0; j < NR; j++) {
            const int64_t n = t * NR + j;
            if (n >= n1) break;
            const float s = scale[n];
            float *o = out + (n - n0) * K;
            for (int64_t b = 0; b < blocks; b++) {
                const int8_t *src = wt + b * 16 * NR + 16 * j;
                const int len = K - b * 16 >= 16 ? 16 : (int)(K - b * 16);
                #pragma omp simd
                for (int l = 0; l < len; l++) o[b * 16 + l] = (float)src[l] * s;
            }
        }
    }
    return 0;
}
