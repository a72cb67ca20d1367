/* Segmented LoRA delta on CPU, float32: the native backend's kernel (loraplex/lora/ops/native.py).
 *
 * For each segment s (tokens start..start+len, one slot):
 *     h[t, :rank]     = x[t] . a[slot, :rank]^T                       (shrink)
 *     out[t, cols_i] += scale[slot] * h[t, rows_i] . b[slot, rows_i, cols_i]   for each block i  (expand)
 * where a block (rows_i, cols_i) is one shard of a packed layer; B is zero outside its blocks, so
 * nothing else is read. Without a block table a slot has one block: all its rank rows, all columns.
 *
 * Decode-sized segments (a few tokens) make this memory bound: every adapter weight is read once
 * per call. Work is cut into units (32 A rows of one segment; 256 output columns of one block of one
 * segment) that the threads of one OpenMP team take dynamically, so mixed ranks balance. The
 * library links libgomp.so.1, which resolves to the copy torch already loaded: one thread pool.
 *
 * With AVX-512, blocks of 4 tokens take hand-vectorised paths that prefetch the weights in software:
 * compiled from the portable loops, the shrink kept one accumulator chain per token and read A at
 * ~7 GB/s on a core that streams 11, and the expand walks B down column strips, a row apart, which
 * the hardware prefetchers do not follow. Measured on the 8-adapter decode step of the benchmark:
 * 19.6 -> 15.2 ms for the 120 calls; then 13.0 -> 11.3 ms with shrink units of 32 A rows (longer
 * sequential runs per thread) and each expand strip's rows prefetched into L2 in one go. Elsewhere (and
 * for odd widths or token tails) the portable loops run.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The adapters' weights (A and B) are float32, or bfloat16 when built with LORAPLEX_BF16_WEIGHTS (the
 * `--lora-dtype bfloat16` build: half the bytes to read, each widened to float32 exactly as it is loaded;
 * x, h, out and every product and sum stay float32). */
#ifdef LORAPLEX_BF16_WEIGHTS
typedef uint16_t weight_t;
static inline float wload(const weight_t *p) {
    uint32_t bits = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#else
typedef float weight_t;
static inline float wload(const weight_t *p) { return *p; }
#endif

#define TB 4       /* tokens per block */
#define RB 32      /* A rows per shrink unit */
#define NU 256     /* output columns per expand unit */
#define TT 64      /* tokens per shrink tile: their x rows stay in cache while A rows stream */
#define SERIAL_WORK 65536  /* below this many multiply-adds one thread beats waking a second */

typedef struct { int64_t seg, block, lo, hi; } unit_t;

#ifdef __AVX512F__
#include <immintrin.h>
#define PF_AHEAD 512  /* floats: A is read this far ahead of use (software prefetch, ~2 KB) */
#define PF_ROWS 8     /* B rows ahead: a column strip strides by a whole row, past the hardware prefetchers */

/* 16 weights as float32. */
static inline __m512 wload16(const weight_t *p) {
#ifdef LORAPLEX_BF16_WEIGHTS
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
#else
    return _mm512_loadu_ps(p);
#endif
}

/* h[0], h[hs], h[2hs], h[3hs] = a . x0..x3 over `in` (a multiple of 32) floats: 8 accumulators. */
static inline void dot4_avx512(float *restrict h, int64_t hs, const weight_t *restrict a, const float *restrict x0,
                               const float *restrict x1, const float *restrict x2, const float *restrict x3,
                               int64_t in) {
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, d0 = c0, d1 = c0, d2 = c0, d3 = c0;
    for (int64_t i = 0; i < in; i += 32) {
        _mm_prefetch((const char *)(a + i + PF_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(a + i + PF_AHEAD + 16), _MM_HINT_T0);
        __m512 a0 = wload16(a + i), a1 = wload16(a + i + 16);
        c0 = _mm512_fmadd_ps(a0, _mm512_loadu_ps(x0 + i), c0);
        d0 = _mm512_fmadd_ps(a1, _mm512_loadu_ps(x0 + i + 16), d0);
        c1 = _mm512_fmadd_ps(a0, _mm512_loadu_ps(x1 + i), c1);
        d1 = _mm512_fmadd_ps(a1, _mm512_loadu_ps(x1 + i + 16), d1);
        c2 = _mm512_fmadd_ps(a0, _mm512_loadu_ps(x2 + i), c2);
        d2 = _mm512_fmadd_ps(a1, _mm512_loadu_ps(x2 + i + 16), d2);
        c3 = _mm512_fmadd_ps(a0, _mm512_loadu_ps(x3 + i), c3);
        d3 = _mm512_fmadd_ps(a1, _mm512_loadu_ps(x3 + i + 16), d3);
    }
    h[0] = _mm512_reduce_add_ps(_mm512_add_ps(c0, d0));
    h[hs] = _mm512_reduce_add_ps(_mm512_add_ps(c1, d1));
    h[2 * hs] = _mm512_reduce_add_ps(_mm512_add_ps(c2, d2));
    h[3 * hs] = _mm512_reduce_add_ps(_mm512_add_ps(c3, d3));
}

/* Rows r0..r1 of a 64-column strip of b into L2, all at once: the strip's rows are a B row apart, so
 * only software keeps enough of them in flight (the expand of the 8-adapter decode step: -13 %). */
static inline void prefetch_strip_l2(const weight_t *b, int64_t brs, int64_t r0, int64_t r1) {
    for (int64_t k = r0; k < r1; k++) {
        const char *p = (const char *)(b + k * brs);
        _mm_prefetch(p, _MM_HINT_T1);
        _mm_prefetch(p + 64, _MM_HINT_T1);
        _mm_prefetch(p + 128, _MM_HINT_T1);
        _mm_prefetch(p + 192, _MM_HINT_T1);
    }
}

/* out[4 tokens, 64 columns] += scale * h[4 tokens, r0:r1] . b[r0:r1, 64 columns]: 16 accumulators. */
static inline void expand4x64_avx512(float *restrict out, int64_t os, const float *restrict h, int64_t hs,
                                     const weight_t *restrict b, int64_t brs, int64_t r0, int64_t r1, float scale) {
    __m512 acc[4][4];
    for (int u = 0; u < 4; u++)
        for (int v = 0; v < 4; v++) acc[u][v] = _mm512_setzero_ps();
    for (int64_t k = r0; k < r1; k++) {
        const weight_t *br = b + k * brs;
        if (k + PF_ROWS < r1) {
            const char *p = (const char *)(br + PF_ROWS * brs);
            _mm_prefetch(p, _MM_HINT_T0);
            _mm_prefetch(p + 64, _MM_HINT_T0);
            _mm_prefetch(p + 128, _MM_HINT_T0);
            _mm_prefetch(p + 192, _MM_HINT_T0);
        }
        __m512 b0 = wload16(br), b1 = wload16(br + 16), b2 = wload16(br + 32), b3 = wload16(br + 48);
        for (int u = 0; u < 4; u++) {
            __m512 hv = _mm512_set1_ps(h[u * hs + k]);
            acc[u][0] = _mm512_fmadd_ps(hv, b0, acc[u][0]);
            acc[u][1] = _mm512_fmadd_ps(hv, b1, acc[u][1]);
            acc[u][2] = _mm512_fmadd_ps(hv, b2, acc[u][2]);
            acc[u][3] = _mm512_fmadd_ps(hv, b3, acc[u][3]);
        }
    }
    __m512 sv = _mm512_set1_ps(scale);
    for (int u = 0; u < 4; u++)
        for (int v = 0; v < 4; v++) {
            float *o = out + u * os + 16 * v;
            _mm512_storeu_ps(o, _mm512_fmadd_ps(sv, acc[u][v], _mm512_loadu_ps(o)));
        }
}
#endif


static void shrink_rows(float *restrict h, int64_t hs, const float *restrict x, int64_t xs,
                        const weight_t *restrict a, int64_t ars, int64_t in, int64_t start, int64_t len,
                        int64_t k0, int64_t k1) {
    for (int64_t t0 = 0; t0 < len; t0 += TT) {
        int64_t t1 = t0 + TT < len ? t0 + TT : len;
        for (int64_t k = k0; k < k1; k++) {
            const weight_t *ar = a + k * ars;
            int64_t t = t0;
            for (; t + TB <= t1; t += TB) {
                const float *x0 = x + (start + t) * xs, *x1 = x0 + xs, *x2 = x1 + xs, *x3 = x2 + xs;
#ifdef __AVX512F__
                if (in % 32 == 0) {
                    dot4_avx512(h + (start + t) * hs + k, hs, ar, x0, x1, x2, x3, in);
                    continue;
                }
#endif
                float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                for (int64_t i = 0; i < in; i++) {
                    float av = wload(ar + i);
                    s0 += x0[i] * av;
                    s1 += x1[i] * av;
                    s2 += x2[i] * av;
                    s3 += x3[i] * av;
                }
                float *hr = h + (start + t) * hs + k;
                hr[0] = s0;
                hr[hs] = s1;
                hr[2 * hs] = s2;
                hr[3 * hs] = s3;
            }
            for (; t < t1; t++) {
                const float *x0 = x + (start + t) * xs;
                float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
                for (int64_t i = 0; i < in; i++) s0 += x0[i] * wload(ar + i);
                h[(start + t) * hs + k] = s0;
            }
        }
    }
}

/* out[t .. t+nt, j0..j1] += scale * h[nt tokens, r0:r1] . b[r0:r1, j0..j1] for nt <= TB tokens and
 * j1 - j0 <= NU columns. B is read row by row, each row's NU columns contiguous, so the hardware
 * prefetchers stream it (a column strip down the rows strides by a whole B row, past their reach);
 * the accumulators (TB x NU floats, 4 KB) stay in L1. Each column sums over k in order. */
static void expand_block(float *restrict out, int64_t os, const float *restrict h, int64_t hs,
                         const weight_t *restrict b, int64_t brs, int64_t r0, int64_t r1, float scale,
                         int64_t nt, int64_t nj) {
    float acc[TB][NU] __attribute__((aligned(64)));
    for (int64_t u = 0; u < nt; u++)
        for (int64_t c = 0; c < nj; c++) acc[u][c] = 0.f;
    if (nt == TB) {  /* each B row loaded once for the 4 tokens: 15 % faster than the general loop (AVX2) */
        for (int64_t k = r0; k < r1; k++) {
            const weight_t *br = b + k * brs;
            float h0 = h[k], h1 = h[hs + k], h2 = h[2 * hs + k], h3 = h[3 * hs + k];
#pragma omp simd
            for (int64_t c = 0; c < nj; c++) {
                float bv = wload(br + c);
                acc[0][c] += h0 * bv;
                acc[1][c] += h1 * bv;
                acc[2][c] += h2 * bv;
                acc[3][c] += h3 * bv;
            }
        }
    } else {
        for (int64_t k = r0; k < r1; k++) {
            const weight_t *br = b + k * brs;
            for (int64_t u = 0; u < nt; u++) {
                float hv = h[u * hs + k];
#pragma omp simd
                for (int64_t c = 0; c < nj; c++) acc[u][c] += hv * wload(br + c);
            }
        }
    }
    for (int64_t u = 0; u < nt; u++) {
        float *o = out + u * os;
#pragma omp simd
        for (int64_t c = 0; c < nj; c++) o[c] += scale * acc[u][c];
    }
}

static void expand_cols(float *restrict out, int64_t os, const float *restrict h, int64_t hs,
                        const weight_t *restrict b, int64_t brs, int64_t r0, int64_t r1, float scale,
                        int64_t start, int64_t len, int64_t j0, int64_t j1) {
    for (int64_t t = 0; t < len; t += TB) {
        int64_t nt = len - t < TB ? len - t : TB;
#ifdef __AVX512F__
        if (nt == TB && (j1 - j0) % 64 == 0) {
            if (t == 0)
                prefetch_strip_l2(b + j0, brs, r0, r1);
            for (int64_t j = j0; j < j1; j += 64) {
                if (j + 64 < j1)
                    prefetch_strip_l2(b + j + 64, brs, r0, r1);  /* the next strip's rows, while this one runs */
                expand4x64_avx512(out + (start + t) * os + j, os, h + (start + t) * hs, hs, b + j, brs, r0, r1,
                                  scale);
            }
            continue;
        }
#endif
        expand_block(out + (start + t) * os + j0, os, h + (start + t) * hs, hs, b + j0, brs, r0, r1, scale,
                     nt, j1 - j0);
    }
}

/* Returns 0, or -1 when scratch memory could not be allocated (out is then untouched). */
int loraplex_add_lora_f32(
    float *out, int64_t out_stride, const float *x, int64_t x_stride,
    const weight_t *a, int64_t a_slot_stride, int64_t a_row_stride,
    const weight_t *b, int64_t b_slot_stride, int64_t b_row_stride,
    const int64_t *ranks, const float *scales, int64_t in_features, int64_t out_features,
    const int64_t *blocks, int64_t num_blocks, /* [slots, num_blocks, 4] or NULL */
    const int64_t *seg_starts, const int64_t *seg_lens, const int64_t *seg_slots, int64_t num_segments,
    int64_t num_tokens, int64_t r_max, int num_threads) {
    int64_t n_shrink = 0, n_expand = 0, work = 0;
    for (int64_t s = 0; s < num_segments; s++) {
        int64_t slot = seg_slots[s], r = ranks[slot];
        if (r == 0 || scales[slot] == 0.f) continue;
        n_shrink += (r + RB - 1) / RB;
        work += seg_lens[s] * r * (in_features + out_features);
        if (blocks == NULL) {
            n_expand += (out_features + NU - 1) / NU;
            continue;
        }
        for (int64_t i = 0; i < num_blocks; i++) {
            const int64_t *blk = blocks + (slot * num_blocks + i) * 4;
            if (blk[1] > 0) n_expand += (blk[3] + NU - 1) / NU;
        }
    }
    if (n_shrink == 0) return 0;
    float *h = (float *)malloc(sizeof(float) * (size_t)(num_tokens * r_max));
    unit_t *units = (unit_t *)malloc(sizeof(unit_t) * (size_t)(n_shrink + n_expand));
    if (h == NULL || units == NULL) {
        free(h);
        free(units);
        return -1;
    }
    int64_t u = 0;
    for (int64_t s = 0; s < num_segments; s++) {
        int64_t slot = seg_slots[s], r = ranks[slot];
        if (r == 0 || scales[slot] == 0.f) continue;
        for (int64_t k = 0; k < r; k += RB) units[u++] = (unit_t){s, -1, k, k + RB < r ? k + RB : r};
    }
    for (int64_t s = 0; s < num_segments; s++) {
        int64_t slot = seg_slots[s], r = ranks[slot];
        if (r == 0 || scales[slot] == 0.f) continue;
        int64_t nb = blocks == NULL ? 1 : num_blocks;
        for (int64_t i = 0; i < nb; i++) {
            int64_t c0 = 0, nc = out_features;
            if (blocks != NULL) {
                const int64_t *blk = blocks + (slot * num_blocks + i) * 4;
                if (blk[1] == 0) continue;
                c0 = blk[2];
                nc = blk[3];
            }
            for (int64_t j = c0; j < c0 + nc; j += NU)
                units[u++] = (unit_t){s, i, j, j + NU < c0 + nc ? j + NU : c0 + nc};
        }
    }
    if (work < SERIAL_WORK) num_threads = 1;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_shrink; i++) {
            int64_t s = units[i].seg, slot = seg_slots[s];
            shrink_rows(h, r_max, x, x_stride, a + slot * a_slot_stride, a_row_stride, in_features,
                        seg_starts[s], seg_lens[s], units[i].lo, units[i].hi);
        }
        /* the implicit barrier above: every h row is written before any expand reads it */
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = n_shrink; i < n_shrink + n_expand; i++) {
            int64_t s = units[i].seg, slot = seg_slots[s], r0 = 0, r1 = ranks[slot];
            if (blocks != NULL) {
                const int64_t *blk = blocks + (slot * num_blocks + units[i].block) * 4;
                r0 = blk[0];
                r1 = blk[0] + blk[1];
            }
            expand_cols(out, out_stride, h, r_max, b + slot * b_slot_stride, b_row_stride, r0, r1,
                        scales[slot], seg_starts[s], seg_lens[s], units[i].lo, units[i].hi);
        }
    }
    free(h);
    free(units);
    return 0;
}
