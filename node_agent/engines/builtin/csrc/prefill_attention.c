/* Causal prefill attention (float32, CPU).
 *
 * q [tokens, heads, head_dim] holds several prompts' new rows back to back (prompt p is rows
 * starts[p]..starts[p+1]); out is [tokens, heads, head_dim]. Query head h attends with kv
 * head h / (heads / kv_heads). Two entry points share one core:
 *  - agora_prefill_attention: prompts from position 0, k and v packed like q
 *    [tokens, kv_heads, head_dim];
 *  - agora_prefill_attention_cache: prompt p's rows sit at positions past[p].. of slot
 *    slots[p] of one layer's cache [slots, kv_heads, max_len, head_dim] (their K and V
 *    already written there), and attend to every earlier position of that slot as well: a
 *    prompt continued after a cached prefix, or the next chunk of a chunked prefill.
 * Each query row's result does not depend on how its prompt was split (scores, the max and
 * the running sums go over keys 0..pos in the same order), so a prompt prefilled in chunks
 * or after a cached prefix gets the same attention output, bit for bit, as in one piece.
 * Work is split into tasks of 16 query rows of one head of one prompt, scheduled longest
 * first. Per task: scores for the block's keys (16 query lanes per vector, 8 keys at a
 * time), a causal mask on the diagonal block, softmax down each lane, then P·V with 16
 * output dims per pass.
 * Needs head_dim % 16 == 0 and AVX-512 for the fast path; returns 1 otherwise (the caller
 * then uses torch's SDPA), -1 when out of memory, 0 on success.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define QB 16

#if defined(__AVX512F__)
/* exp(x) for x <= 0, 16 lanes: Cephes' expf (range reduction to [-ln2/2, ln2/2], degree-6
 * polynomial), scaled by 2^n with scalef; about 1 ulp. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}
#endif

/* A task: 16 query rows (row0..) of one query head of one prompt (tile), or, for a prompt of
 * at most RB new rows (a small chunk or a short continuation), all its rows for every query
 * head sharing one kv head (rowwise: `head` is then the kv head). */
typedef struct { int64_t prompt, head, row0, keys, rowwise; } task_t;

/* Per-thread scratch buffers that only grow: OpenMP's pool threads live as long as the
 * process, so a buffer is allocated once, not per call. Allocating them per call (hundreds of
 * KB at a few thousand positions, so mmap'd and page-faulted afresh each time) cost a chunk
 * of one row at position 3,000 more than its attention. Never freed: at most four buffers
 * per thread, sized by the longest sequence seen. */
static _Thread_local float *scratch_buf[4];
static _Thread_local size_t scratch_cap[4];

static float *scratch(int i, size_t floats) {
    if (scratch_cap[i] < floats) {
        size_t cap = (floats + 4095) / 4096 * 4096; /* a multiple of 64 bytes, as aligned_alloc wants */
        float *p = (float *)aligned_alloc(64, sizeof(float) * cap);
        if (!p) return NULL;
        free(scratch_buf[i]);
        scratch_buf[i] = p;
        scratch_cap[i] = cap;
    }
    return scratch_buf[i];
}

/* Prompts with at most this many new rows take the row-wise path. A tile computes 16 query
 * lanes whatever its rows, so a 4-row chunk at position 3,000 cost as much as 16 rows (and
 * about as much as the decode step of 16 streams it rides with). Row-wise, the kv head's keys
 * are transposed once into dimension-major order and each (row, head) pays for itself. Its
 * arithmetic per row is the tile's, operation for operation (scores: one fma per dimension in
 * order; softmax sum: keys in order; P.V: one fma per key in order), so a row's output does
 * not depend on which path computed it. */
#define RB 4

static int by_keys_desc(const void *a, const void *b) {
    int64_t ka = ((const task_t *)a)->keys, kb = ((const task_t *)b)->keys;
    return (ka < kb) - (ka > kb);
}

#if defined(__AVX512F__)
/* r[0..15] (rows) becomes its transpose: r[i] lane j <- r[j] lane i. */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int k = 0; k < 8; k++) {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; k++) {
        __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 1]);
        __m512d c = _mm512_castps_pd(t[4 * k + 2]), d = _mm512_castps_pd(t[4 * k + 3]);
        r[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int k = 0; k < 4; k++) {
        t[k] = _mm512_shuffle_f32x4(r[k], r[k + 4], 0x88);
        t[k + 4] = _mm512_shuffle_f32x4(r[k], r[k + 4], 0xDD);
        t[k + 8] = _mm512_shuffle_f32x4(r[k + 8], r[k + 12], 0x88);
        t[k + 12] = _mm512_shuffle_f32x4(r[k + 8], r[k + 12], 0xDD);
    }
    for (int k = 0; k < 8; k++) {
        r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xDD);
    }
}

/* The row-wise path for one kv head of one prompt: rows 0..n-1 (positions past..past+n-1)
 * of each of the `group` query heads kvh*group.. . kb, vb: this kv head's key/value 0; rs:
 * stride between positions; kt [head_dim][kpad], s [>= keys] scratch. */
static void rowwise_task(const float *restrict q, const float *restrict kb, const float *restrict vb, int64_t rs,
                         int64_t past, float *restrict out, int64_t base, int64_t n, int64_t kvh, int64_t group,
                         int64_t qs, int64_t head_dim, int64_t kpad, float scale, float *restrict kt,
                         float *restrict s)
{
    const int64_t nk = past + n, nb = (nk + 15) / 16 * 16;
    /* keys into dimension-major order, 16 keys x 16 dims per in-register transpose (keys
     * past nk repeat the last one; they are never visible) */
    for (int64_t j0 = 0; j0 < nb; j0 += 16)
        for (int64_t d0 = 0; d0 < head_dim; d0 += 16) {
            __m512 r[16];
            for (int u = 0; u < 16; u++) r[u] = _mm512_loadu_ps(kb + (j0 + u < nk ? j0 + u : nk - 1) * rs + d0);
            transpose16(r);
            for (int u = 0; u < 16; u++) _mm512_store_ps(kt + (d0 + u) * kpad + j0, r[u]);
        }
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t g = 0; g < group; g++) {
        const int64_t head = kvh * group + g;
        for (int64_t r = 0; r < n; r++) {
            const float *qr = q + (base + r) * qs + head * head_dim;
            const int64_t vis = past + r + 1; /* keys 0..past+r */
            const int64_t vb16 = (vis + 15) / 16 * 16;
            /* scores: lane = key; per key the tile's sum, fma over d in order, of (q*scale)*k */
            for (int64_t j0 = 0; j0 < vb16; j0 += 128) { /* 8 blocks of 16 keys: 8 independent chains */
                const int nbk = vb16 - j0 >= 128 ? 8 : (int)((vb16 - j0) / 16);
                __m512 a[8];
                for (int b = 0; b < 8; b++) a[b] = _mm512_setzero_ps();
                for (int64_t d = 0; d < head_dim; d++) {
                    const __m512 qd = _mm512_set1_ps(qr[d] * scale);
                    const float *kd = kt + d * kpad + j0;
                    for (int b = 0; b < nbk; b++) a[b] = _mm512_fmadd_ps(qd, _mm512_load_ps(kd + 16 * b), a[b]);
                }
                for (int b = 0; b < nbk; b++) _mm512_store_ps(s + j0 + 16 * b, a[b]);
            }
            for (int64_t j = vis; j < vb16; j++) s[j] = -INFINITY;
            __m512 mv = ninf;
            for (int64_t j0 = 0; j0 < vb16; j0 += 16) mv = _mm512_max_ps(mv, _mm512_load_ps(s + j0));
            const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
            for (int64_t j0 = 0; j0 < vb16; j0 += 16)
                _mm512_store_ps(s + j0, exp512(_mm512_sub_ps(_mm512_load_ps(s + j0), m)));
            float sum = 0.0f; /* keys in order, as the tile's lane does */
            for (int64_t j = 0; j < vis; j++) sum += s[j];
            const float inv = 1.0f / sum;
            float *o = out + (base + r) * qs + head * head_dim;
            for (int64_t d0 = 0; d0 < head_dim; d0 += 64) { /* up to 4 x 16 dims: independent chains */
                const int nd = head_dim - d0 >= 64 ? 4 : (int)((head_dim - d0) / 16);
                __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                for (int64_t j = 0; j < vis; j++) {
                    const __m512 pj = _mm512_set1_ps(s[j]);
                    const float *vr = vb + j * rs + d0;
                    for (int b = 0; b < nd; b++) acc[b] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 16 * b), acc[b]);
                }
                for (int b = 0; b < nd; b++)
                    _mm512_storeu_ps(o + d0 + 16 * b, _mm512_mul_ps(acc[b], _mm512_set1_ps(inv)));
            }
        }
    }
}
#endif

/* kbase[p], vbase[p]: prompt p's key/value 0 of kv head 0; rs: stride between positions,
 * hs: stride between kv heads; past[p]: the position of prompt p's first new row. */
static int prefill_core(
    const float *restrict q, const float *const *kbase, const float *const *vbase, int64_t rs, int64_t hs,
    const int64_t *restrict past, float *restrict out, const int64_t *restrict starts, int64_t prompts,
    int64_t heads, int64_t kv_heads, int64_t head_dim, float scale, int threads)
{
#if !defined(__AVX512F__)
    (void)q; (void)kbase; (void)vbase; (void)rs; (void)hs; (void)past; (void)out; (void)starts; (void)prompts;
    (void)heads; (void)kv_heads; (void)head_dim; (void)scale; (void)threads;
    return 1;
#else
    if (head_dim % 16 != 0 || heads % kv_heads != 0) return 1;
    const int64_t group = heads / kv_heads, qs = heads * head_dim;
    int64_t ntasks = 0, longest = 0;
    for (int64_t p = 0; p < prompts; p++) {
        int64_t n = starts[p + 1] - starts[p];
        ntasks += n <= RB ? kv_heads : heads * ((n + QB - 1) / QB);
        if (past[p] + n > longest) longest = past[p] + n;
    }
    task_t *tasks = (task_t *)malloc(sizeof(task_t) * (size_t)(ntasks ? ntasks : 1));
    if (!tasks) return -1;
    int64_t t = 0;
    for (int64_t p = 0; p < prompts; p++) {
        int64_t n = starts[p + 1] - starts[p];
        if (n <= RB) {
            for (int64_t h = 0; h < kv_heads; h++) {
                task_t x = {p, h, 0, past[p] + n, 1};
                tasks[t++] = x;
            }
            continue;
        }
        for (int64_t h = 0; h < heads; h++)
            for (int64_t r = 0; r < n; r += QB) {
                task_t x = {p, h, r, past[p] + (r + QB < n ? r + QB : n), 0};
                tasks[t++] = x;
            }
    }
    qsort(tasks, (size_t)ntasks, sizeof(task_t), by_keys_desc);
    const int64_t kpad = (longest + 15) / 16 * 16;
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        /* qt: the block's queries transposed [head_dim][16]; st: scores [keys][16]. */
        float *qt = scratch(0, (size_t)(head_dim * QB));
        float *st = scratch(1, (size_t)(kpad * QB));
        float *ot = scratch(2, (size_t)(head_dim * QB));
        float *kt = NULL; /* row-wise: the kv head's keys [head_dim][kpad] */
        if (!qt || !st || !ot) failed = 1;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < ntasks; i++) {
            if (!qt || !st || !ot) continue;
            const task_t x = tasks[i];
            if (x.rowwise) {
                if (!kt && !(kt = scratch(3, (size_t)(head_dim * kpad)))) {
                    failed = 1;
                    continue;
                }
                rowwise_task(q, kbase[x.prompt] + x.head * hs, vbase[x.prompt] + x.head * hs, rs, past[x.prompt],
                             out, starts[x.prompt], starts[x.prompt + 1] - starts[x.prompt], x.head, group, qs,
                             head_dim, kpad, scale, kt, st);
                continue;
            }
            const int64_t base = starts[x.prompt], pos0 = past[x.prompt] + x.row0, rows = x.keys - pos0;
            const int64_t kvh = x.head / group, nk = x.keys;
            for (int64_t d = 0; d < head_dim; d++)
                for (int64_t r = 0; r < QB; r++)
                    qt[d * QB + r] = r < rows ? q[(base + x.row0 + r) * qs + x.head * head_dim + d] * scale : 0.0f;
            const float *kb = kbase[x.prompt] + kvh * hs;
            const float *vb = vbase[x.prompt] + kvh * hs;
            /* scores, 8 keys at a time (keys past nk read a valid earlier row and are masked) */
            for (int64_t j = 0; j < nk; j += 8) {
                __m512 a[8];
                const float *kr[8];
                for (int u = 0; u < 8; u++) {
                    a[u] = _mm512_setzero_ps();
                    kr[u] = kb + (j + u < nk ? j + u : nk - 1) * rs;
                }
                for (int64_t d = 0; d < head_dim; d++) {
                    const __m512 qd = _mm512_load_ps(qt + d * QB);
                    for (int u = 0; u < 8; u++) a[u] = _mm512_fmadd_ps(qd, _mm512_set1_ps(kr[u][d]), a[u]);
                }
                for (int u = 0; u < 8; u++) _mm512_store_ps(st + (j + u) * QB, a[u]);
            }
            /* causal mask: key j is visible to row r iff j <= pos0 + r */
            const __m512 lane = _mm512_add_ps(_mm512_set1_ps((float)pos0),
                _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
            const __m512 ninf = _mm512_set1_ps(-INFINITY);
            for (int64_t j = pos0; j < nk; j++) {
                __mmask16 hide = _mm512_cmp_ps_mask(_mm512_set1_ps((float)j), lane, _CMP_GT_OQ);
                _mm512_store_ps(st + j * QB, _mm512_mask_mov_ps(_mm512_load_ps(st + j * QB), hide, ninf));
            }
            /* softmax down each lane */
            __m512 m = ninf;
            for (int64_t j = 0; j < nk; j++) m = _mm512_max_ps(m, _mm512_load_ps(st + j * QB));
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < nk; j++) {
                const __m512 e = exp512(_mm512_sub_ps(_mm512_load_ps(st + j * QB), m));
                _mm512_store_ps(st + j * QB, e);
                sum = _mm512_add_ps(sum, e);
            }
            float inv[QB];
            _mm512_storeu_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), sum));
            /* P·V into ot [head_dim][16], 16 dims per pass, then out (1/sum applied there) */
            for (int64_t d0 = 0; d0 < head_dim; d0 += 16) {
                __m512 acc[16];
                for (int u = 0; u < 16; u++) acc[u] = _mm512_setzero_ps();
                for (int64_t j = 0; j < nk; j++) {
                    const __m512 pj = _mm512_load_ps(st + j * QB);
                    const float *vr = vb + j * rs + d0;
                    for (int u = 0; u < 16; u++) acc[u] = _mm512_fmadd_ps(pj, _mm512_set1_ps(vr[u]), acc[u]);
                }
                for (int u = 0; u < 16; u++) _mm512_store_ps(ot + (d0 + u) * QB, acc[u]);
            }
            for (int64_t r = 0; r < rows; r++) {
                float *o = out + (base + x.row0 + r) * qs + x.head * head_dim;
                for (int64_t d = 0; d < head_dim; d++) o[d] = ot[d * QB + r] * inv[r];
            }
        }
    }
    free(tasks);
    return failed ? -1 : 0;
#endif
}

int agora_prefill_attention(
    const float *restrict q, const float *restrict k, const float *restrict v, float *restrict out,
    const int64_t *restrict starts, int64_t prompts, int64_t heads, int64_t kv_heads, int64_t head_dim,
    float scale, int threads)
{
    const int64_t ks = kv_heads * head_dim, n = prompts ? prompts : 1;
    const float **kb = (const float **)malloc(sizeof(float *) * (size_t)n);
    const float **vb = (const float **)malloc(sizeof(float *) * (size_t)n);
    int64_t *past = (int64_t *)calloc((size_t)n, sizeof(int64_t));
    int rc = -1;
    if (kb && vb && past) {
        for (int64_t p = 0; p < prompts; p++) {
            kb[p] = k + starts[p] * ks;
            vb[p] = v + starts[p] * ks;
        }
        rc = prefill_core(q, kb, vb, ks, head_dim, past, out, starts, prompts, heads, kv_heads, head_dim, scale,
                          threads);
    }
    free(kb);
    free(vb);
    free(past);
    return rc;
}

int agora_prefill_attention_cache(
    const float *restrict q, const float *restrict k_cache, const float *restrict v_cache, float *restrict out,
    const int64_t *restrict starts, const int64_t *restrict slots, const int64_t *restrict past, int64_t prompts,
    int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_len, float scale, int threads)
{
    const int64_t n = prompts ? prompts : 1;
    const float **kb = (const float **)malloc(sizeof(float *) * (size_t)n);
    const float **vb = (const float **)malloc(sizeof(float *) * (size_t)n);
    int rc = -1;
    if (kb && vb) {
        rc = 0;
        for (int64_t p = 0; p < prompts; p++) {
            if (past[p] < 0 || past[p] + starts[p + 1] - starts[p] > max_len) rc = -2;
            kb[p] = k_cache + slots[p] * kv_heads * max_len * head_dim;
            vb[p] = v_cache + slots[p] * kv_heads * max_len * head_dim;
        }
        if (rc == 0)
            rc = prefill_core(q, kb, vb, head_dim, max_len * head_dim, past, out, starts, prompts, heads, kv_heads,
                              head_dim, scale, threads);
    }
    free(kb);
    free(vb);
    return rc;
}
