// The two elementwise passes around an int8 linear layer's integer product (loraplex/model/quant.py),
// each one pass over its rows instead of the five or six torch ops it replaces. Built by loraplex/cbuild.py
// with -ffp-contract=off, so every product and sum rounds exactly as torch's ops round them.

#include <math.h>
#include <stdint.h>

// Rows large enough to split over threads; smaller work runs on the calling thread.
#define PARALLEL_MIN 32768

// For each row r of x: x_out[r, k] = x[r, outliers[k]] (the channels kept in float), then with
// v[j] = x[r, j] * inv_smooth[j], zero where mask[j]: scale[r] = max(max_j |v[j]|, 1e-12) / 127 and
// q[r, j] = round(v[j] / scale[r]), half to even; as int8_linear_torch computes them. A NaN in a row makes
// its scale NaN (and so its output), as torch's amax does.
void loraplex_quantize_rows(const float *x, int64_t rows, int64_t cols, int64_t stride_x, const float *inv_smooth,
                            const uint8_t *mask, const int64_t *outliers, int64_t n_out, int8_t *q, float *scale,
                            float *x_out) {
#pragma omp parallel for if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride_x;
        int8_t *out = q + r * cols;
        for (int64_t k = 0; k < n_out; k++) x_out[r * n_out + k] = row[outliers[k]];
        // Written for the vectorizer: a select for the mask, a plain maximum and a separate NaN flag (a NaN
        // in a row makes its scale NaN, as torch's amax does).
        float peak = 0.0f;
        int nan = 0;
#pragma omp simd reduction(max : peak) reduction(| : nan)
        for (int64_t j = 0; j < cols; j++) {
            const float v = mask[j] ? 0.0f : fabsf(row[j] * inv_smooth[j]);
            peak = v > peak ? v : peak;
            nan |= v != v;
        }
        float s = (nan ? NAN : (peak > 1e-12f ? peak : 1e-12f)) / 127.0f;
        scale[r] = s;
        if (s != s) {  // the row's output is NaN whatever its integers (rounding NaN to int8 is undefined)
            for (int64_t j = 0; j < cols; j++) out[j] = 0;
            continue;
        }
#pragma omp simd
        for (int64_t j = 0; j < cols; j++) {
            const float v = mask[j] ? 0.0f : nearbyintf((row[j] * inv_smooth[j]) / s);
            out[j] = (int8_t)(int32_t)v;
        }
    }
}

// out[r, c] = (float)acc[r, c] * row_scale[r] * col_scale[c] (+ bias[c]) + x_out[r, 0] * w_out[0, c] + ...,
// each step rounded in that order, as int8_linear_torch's ops; bias may be NULL.
void loraplex_dequantize_rows(const int32_t *acc, int64_t rows, int64_t cols, const float *row_scale,
                              const float *col_scale, const float *bias, const float *x_out, const float *w_out,
                              int64_t n_out, float *out) {
#pragma omp parallel for if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *in = acc + r * cols;
        float *o = out + r * cols;
        const float s = row_scale[r];
        if (bias) {
            for (int64_t c = 0; c < cols; c++) o[c] = (float)in[c] * s * col_scale[c] + bias[c];
        } else {
            for (int64_t c = 0; c < cols; c++) o[c] = (float)in[c] * s * col_scale[c];
        }
        for (int64_t k = 0; k < n_out; k++) {
            const float xv = x_out[r * n_out + k];
            const float *w = w_out + k * cols;
            for (int64_t c = 0; c < cols; c++) o[c] = o[c] + xv * w[c];
        }
    }
}

// An int4 layer's weight decoded to float32 (loraplex/model/quant.py, Int4Weight): out[r, k] =
// q * scale[r, k / group] + low[r, k / group] for output row r and input k, q the low nibble of packed[r, k / 2]
// for an even k and the high one for an odd k; out is [rows, cols], group a multiple of 32. One multiply and
// one add, each rounded (-ffp-contract=off), as Int4Weight.dense computes them.
void loraplex_int4_decode(const uint8_t *packed, int64_t rows, int64_t cols, const float *scale, const float *low,
                          int64_t group, float *out) {
    const int64_t groups = cols / group;
#pragma omp parallel for if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *in = packed + r * (cols / 2);
        const float *s = scale + r * groups, *m = low + r * groups;
        float *o = out + r * cols;
        for (int64_t j = 0; j < cols / 32; j++) {  // 32 inputs (16 bytes) at a time: decoded, then interleaved
            const int64_t g = j * 32 / group;
            const float sg = s[g], mg = m[g];
            const uint8_t *b = in + j * 16;
            float *oj = o + j * 32, even[16], odd[16];
            for (int i = 0; i < 16; i++) {
                even[i] = (float)(b[i] & 15) * sg + mg;
                odd[i] = (float)(b[i] >> 4) * sg + mg;
            }
            for (int i = 0; i < 16; i++) {
                oj[2 * i] = even[i];
                oj[2 * i + 1] = odd[i];
            }
        }
    }
}

// out[m, r] = Σ_k x[m, k] · w[r, k] (+ bias[r]) for the m < n_x <= 8 rows of a small batch, an int4 layer's
// weight decoded 32 inputs at a time in registers and never written out: at decode batch sizes the layer
// then reads its 4-bit weight once instead of writing and reading a float32 copy. xe and xo are x's even
// and odd inputs ([n_x, cols / 2] each, contiguous), so each 16-byte chunk's low and high nibbles meet
// their inputs in two vectors. Sums in 16 lanes, then across them: rounding differs from a GEMM's.
void loraplex_int4_linear_rows(const uint8_t *packed, int64_t rows, int64_t cols, const float *scale,
                               const float *low, int64_t group, const float *xe, const float *xo, int64_t n_x,
                               const float *bias, float *out) {
    const int64_t groups = cols / group, half = cols / 2;
#pragma omp parallel for if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *in = packed + r * half;
        const float *s = scale + r * groups, *m = low + r * groups;
        float acc[8][16] = {{0}};
        for (int64_t j = 0; j < cols / 32; j++) {
            const int64_t g = j * 32 / group;
            const float sg = s[g], mg = m[g];
            const uint8_t *b = in + j * 16;
            float even[16], odd[16];
            for (int i = 0; i < 16; i++) {
                even[i] = (float)(b[i] & 15) * sg + mg;
                odd[i] = (float)(b[i] >> 4) * sg + mg;
            }
            for (int64_t row = 0; row < n_x; row++) {
                const float *e = xe + row * half + j * 16, *o = xo + row * half + j * 16;
                for (int i = 0; i < 16; i++) acc[row][i] += even[i] * e[i] + odd[i] * o[i];
            }
        }
        for (int64_t row = 0; row < n_x; row++) {
            float sum = 0.0f;
            for (int i = 0; i < 16; i++) sum += acc[row][i];
            out[row * rows + r] = bias ? sum + bias[r] : sum;
        }
    }
}
