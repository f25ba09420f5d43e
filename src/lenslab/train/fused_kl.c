/* KL(p || q) and its gradient softmax(q) - p, one (lens position, token) row of a chunk at a time, for
 * lenslab.train.native_kl (see its docstring for how this is compiled and called, and chunked_kl.py for the maths).
 *
 * A row's `gap` is the lens's logits minus the target's, its `log_p` and `p` the target's log-probabilities and
 * probabilities. With s = scale * gap + log_p (= log q + log sum_v p_v e^(scale * gap_v)):
 *     kl   = log sum_v e^(s_v) - sum_v p_v scale gap_v
 *     grad = scale * (softmax(s) - p)
 * Three passes over the row, which stays in the core's cache, against about ten passes over the whole chunk that
 * eager PyTorch makes. Compiled with -ffast-math so that expf is vectorised (glibc's libmvec); the inputs are
 * checked to be finite by the caller, since -ffast-math assumes they are.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float load_bf16(const uint16_t *x, int64_t i) {
    uint32_t bits = (uint32_t)x[i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline void store_bf16(uint16_t *x, int64_t i, float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u); /* round to nearest, ties to even */
    x[i] = (uint16_t)(bits >> 16);
}

static inline float load_f32(const float *x, int64_t i) { return x[i]; }
static inline void store_f32(float *x, int64_t i, float value) { x[i] = value; }

/* All `rows` rows of a [positions * tokens, vocab] chunk, row r belonging to token r % tokens, on `threads` OpenMP
 * threads (torch's own pool: see native_kl.py). Returns 0, or -1 if the row buffers could not be allocated. */
#define KL_ROWS(NAME, T, LOAD, STORE)                                                                              \
    int NAME(const T *gap, const float *log_p, const float *p, T *grad, float *kl, int64_t rows, int64_t tokens,   \
             int64_t vocab, float scale, int threads) {                                                            \
        float *buffers = malloc((size_t)threads * vocab * sizeof(float));                                          \
        if (buffers == NULL) return -1;                                                                            \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                          \
        for (int64_t r = 0; r < rows; r++) {                                                                       \
            float *row = buffers + (int64_t)omp_get_thread_num() * vocab;                                          \
            const T *g = gap + r * vocab;                                                                          \
            const float *lp = log_p + (r % tokens) * vocab, *pr = p + (r % tokens) * vocab;                        \
            float peak = -3.0e38f, mean = 0.0f, total = 0.0f;                                                      \
            for (int64_t v = 0; v < vocab; v++) {                                                                  \
                float scaled = scale * LOAD(g, v);                                                                 \
                float s = scaled + lp[v];                                                                          \
                row[v] = s;                                                                                        \
                peak = s > peak ? s : peak;                                                                        \
                mean += pr[v] * scaled;                                                                            \
            }                                                                                                      \
            for (int64_t v = 0; v < vocab; v++) {                                                                  \
                row[v] = expf(row[v] - peak);                                                                      \
                total += row[v];                                                                                   \
            }                                                                                                      \
            float inverse = 1.0f / total;                                                                          \
            T *out = grad + r * vocab;                                                                             \
            for (int64_t v = 0; v < vocab; v++) STORE(out, v, scale * (row[v] * inverse - pr[v]));                 \
            kl[r] = peak + logf(total) - mean;                                                                     \
        }                                                                                                          \
        free(buffers);                                                                                             \
        return 0;                                                                                                  \
    }

KL_ROWS(kl_rows_bf16, uint16_t, load_bf16, store_bf16)
KL_ROWS(kl_rows_f32, float, load_f32, store_f32)
