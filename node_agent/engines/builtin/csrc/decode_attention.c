/* Fused decode attention over the engine's slot-based KV cache (float32, CPU).
 *
 * One call per layer and decode step. For each (row b, kv head h) it writes the step's new
 * K and V at position pos[b] of slot b, then attends the `groups` query heads that share
 * kv head h over positions 0..pos[b] of that slot. K and V are both stored
 * [slot, kv_head, max_len, head_dim], so each task reads two contiguous runs of memory.
 * Measured here (tiny-20m, 32 rows of 100-700 positions, 6 layers, cache in DRAM, 2
 * threads): 5.7 ms vs 12.0 ms for the torch path (baddbmm + softmax + bmm).
 *
 * Built and loaded at run time by native.py (cc -O3 -march=native -fopenmp); the OpenMP
 * runtime is the libgomp torch has already loaded, so this shares torch's thread pool.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) for x <= 0 (softmax after subtracting the max): Cephes' expf, range reduction to
 * [-ln2/2, ln2/2], a degree-6 polynomial, 2^n from the exponent bits; about 1 ulp, and
 * vectorisable (no branches, no calls). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}

/* q [rows, kv_heads, groups, head_dim]; k_new, v_new [rows, kv_heads, head_dim];
 * pos [rows]; k_cache, v_cache: one layer, [slots >= rows, kv_heads, max_len, head_dim];
 * out [rows, kv_heads, groups, head_dim]. All contiguous. Returns 0, or -1 when out of memory. */
int agora_decode_attention(
    const float *restrict q, const float *restrict k_new, const float *restrict v_new,
    const int64_t *restrict pos, float *restrict k_cache, float *restrict v_cache, float *restrict out,
    int64_t rows, int64_t kv_heads, int64_t groups, int64_t head_dim, int64_t max_len,
    float scale, int threads)
{
    const int64_t tasks = rows * kv_heads;
    const int64_t ld = (max_len + 15) / 16 * 16;
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        float *s = (float *)aligned_alloc(64, sizeof(float) * (size_t)(groups * ld));
        if (!s) failed = 1;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (!s) continue;
            const int64_t p = pos[t / kv_heads], n = p + 1;
            float *restrict k = k_cache + t * max_len * head_dim;
            float *restrict v = v_cache + t * max_len * head_dim;
            memcpy(k + p * head_dim, k_new + t * head_dim, sizeof(float) * head_dim);
            memcpy(v + p * head_dim, v_new + t * head_dim, sizeof(float) * head_dim);
            const float *restrict qt = q + t * groups * head_dim;
            for (int64_t i = 0; i < n; i++) {
                const float *restrict kr = k + i * head_dim;
                for (int64_t g = 0; g < groups; g++) {
                    const float *restrict qg = qt + g * head_dim;
                    float acc = 0.0f;
                    #pragma omp simd reduction(+:acc)
                    for (int64_t d = 0; d < head_dim; d++) acc += qg[d] * kr[d];
                    s[g * ld + i] = acc * scale;
                }
            }
            float *restrict o = out + t * groups * head_dim;
            for (int64_t g = 0; g < groups; g++) {
                float *restrict sg = s + g * ld;
                float m = sg[0], sum = 0.0f;
                #pragma omp simd reduction(max:m)
                for (int64_t i = 1; i < n; i++) m = sg[i] > m ? sg[i] : m;
                #pragma omp simd reduction(+:sum)
                for (int64_t i = 0; i < n; i++) {
                    sg[i] = exp_nonpositive(sg[i] - m);
                    sum += sg[i];
                }
                const float inv = 1.0f / sum;
                for (int64_t i = 0; i < n; i++) sg[i] *= inv;
                memset(o + g * head_dim, 0, sizeof(float) * head_dim);
            }
            for (int64_t i = 0; i < n; i++) {
                const float *restrict vr = v + i * head_dim;
                for (int64_t g = 0; g < groups; g++) {
                    const float w = s[g * ld + i];
                    float *restrict og = o + g * head_dim;
                    for (int64_t d = 0; d < head_dim; d++) og[d] += w * vr[d];
                }
            }
        }
        free(s);
    }
    return failed ? -1 : 0;
}
