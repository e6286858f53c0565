/* t5kit's own CPU kernel for the decode step's fp32 projections (issue 19): y = x W^T, where
 *   x (M, K) row-major, y (M, N) row-major, and W (N, K) is held as ceil(N / 32) panels of
 *   (K, 32): panel b, row k holds W[32b .. 32b + 31, k] (rows past N are zeros).
 *
 * Why: a decode step streams every weight from memory once, for 1-16 rows of x. oneDNN's packed
 * GEMM spends ~16 us a call before it streams, and its GEMV reached 17-28 GB/s on a 2-core AMD EPYC
 * Zen 4 where a plain loop over panels reaches 30-40 GB/s (docs/inference.md). A panel is one
 * contiguous stream; each step of k broadcasts x[m, k] against 32 outputs (the outer-product form
 * of a GEMM microkernel), so no horizontal sums are needed and rows of x share each weight load.
 *
 * Rounding: k is summed in chunks of KC, each chunk in registers and then added to y, which keeps
 * the error of a K = 3,072 dot product at MKL's level (one running sum over all of K doubled it),
 * in one order whatever the number of rows (TILE).
 * Threads: OpenMP over panels, `threads` of them (PyTorch's count, passed in: the OpenMP default of
 * a thread PyTorch did not set up is every core). Built by cpu_kernel.py with -fopenmp, so it shares
 * the libgomp that PyTorch's Linux wheels load, and with it one thread pool. */
#include <immintrin.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
typedef __m512 vf;
#define NV 2      /* vectors per 32-wide panel row */
#define MRMAX 12  /* rows of x per tile: 24 accumulators + 2 weights + 1 broadcast of 32 registers */
#define LD _mm512_loadu_ps
#define ST _mm512_storeu_ps
#define FMA _mm512_fmadd_ps
#define BC _mm512_set1_ps
#define ZERO _mm512_setzero_ps
#define ADD _mm512_add_ps
#else  /* AVX2 + FMA */
typedef __m256 vf;
#define NV 4
#define MRMAX 3   /* 12 accumulators + 4 weights + 1 broadcast: one more than 16 registers, measured best */
#define LD _mm256_loadu_ps
#define ST _mm256_storeu_ps
#define FMA _mm256_fmadd_ps
#define BC _mm256_set1_ps
#define ZERO _mm256_setzero_ps
#define ADD _mm256_add_ps
#endif
#define VW (32 / NV)
#define KC 128

/* y[0 .. cols) = a (first chunk of k) or y += a (later chunks); cols < 32 in the last panel only */
static inline void emit(float *y, const vf *a, long cols, int first) {
  if (cols == 32) {
    for (int v = 0; v < NV; v++) ST(y + v * VW, first ? a[v] : ADD(a[v], LD(y + v * VW)));
    return;
  }
  float t[32];
  for (int v = 0; v < NV; v++) ST(t + v * VW, a[v]);
  for (long c = 0; c < cols; c++) y[c] = first ? t[c] : y[c] + t[c];
}

/* MR rows of x (stride ldx) over kl steps of k; each weight load serves MR rows. Every tile size
 * sums an output in the same order (one FMA chain a chunk, chunks added to y in turn), so a row's
 * result does not depend on the other rows of the call: a request decodes the same alone or in
 * serve's shared batch. (A one-row path with four chains a vector was no faster: the step is
 * memory-bound.) */
#define TILE(MR)                                                                                  \
  static inline void tile##MR(const float *x, long ldx, const float *w, float *y, long N, long kl, \
                              long cols, int first) {                                            \
    vf a[MR][NV];                                                                                 \
    for (int i = 0; i < MR; i++) for (int v = 0; v < NV; v++) a[i][v] = ZERO();                   \
    for (long k = 0; k < kl; k++) {                                                               \
      vf wv[NV];                                                                                  \
      for (int v = 0; v < NV; v++) wv[v] = LD(w + k * 32 + v * VW);                               \
      for (int i = 0; i < MR; i++) {                                                              \
        vf xb = BC(x[i * ldx + k]);                                                               \
        for (int v = 0; v < NV; v++) a[i][v] = FMA(xb, wv[v], a[i][v]);                          \
      }                                                                                           \
    }                                                                                             \
    for (int i = 0; i < MR; i++) emit(y + i * N, a[i], cols, first);                              \
  }
TILE(1)
TILE(2)
TILE(3)
#if MRMAX == 12
TILE(4)
TILE(8)
TILE(12)
#endif

/* x's rows regrouped by chunk of k, (ceil(K / KC), M, KC): rows of one chunk KC floats apart.
 * Rows K floats apart map to the same L1 sets when K * 4 is a multiple of 4 KB (K = 1,024, 2,048,
 * 3,072: FFN output projections), and a 12-row tile then evicts its own rows: t5-base's 768 x 3072
 * at 16 rows took 1.2x oneDNN's time before, on a Zen 4. */
static float *by_chunk(const float *x, long M, long K) {
  long chunks = (K + KC - 1) / KC;
  float *out = malloc(sizeof(float) * chunks * M * KC);
  if (!out) return NULL;
  for (long c = 0; c < chunks; c++) {
    long kl = K - c * KC < KC ? K - c * KC : KC;
    for (long m = 0; m < M; m++) memcpy(out + (c * M + m) * KC, x + m * K + c * KC, sizeof(float) * kl);
  }
  return out;
}

/* Returns 0, or -1 when out of memory for the regrouped rows (nothing is written then). */
int t5kit_linear(const float *x, const float *w, float *y, long M, long N, long K, int threads) {
  long panels = (N + 31) / 32;
  int regroup = M > 1 && K > KC;
  float *xc = regroup ? by_chunk(x, M, K) : NULL;
  if (regroup && !xc) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long b = 0; b < panels; b++) {
    long cols = N - b * 32 < 32 ? N - b * 32 : 32;
    /* k in chunks: the chunk of the panel (KC x 32 floats, 16 KB) stays in L1 across the rows */
    for (long k0 = 0; k0 < K; k0 += KC) {
      long kl = K - k0 < KC ? K - k0 : KC;
      const float *wp = w + (b * K + k0) * 32;
      long ldx = xc ? KC : K;
      const float *xm = xc ? xc + k0 * M : x + k0;  /* chunk k0 / KC of row 0 */
      float *ym = y + b * 32;
      int first = k0 == 0;
      long r = M;
      for (; r >= MRMAX; r -= MRMAX, xm += MRMAX * ldx, ym += MRMAX * N)
#if MRMAX == 12
        tile12(xm, ldx, wp, ym, N, kl, cols, first);
      if (r >= 8) { tile8(xm, ldx, wp, ym, N, kl, cols, first); r -= 8; xm += 8 * ldx; ym += 8 * N; }
      if (r >= 4) { tile4(xm, ldx, wp, ym, N, kl, cols, first); r -= 4; xm += 4 * ldx; ym += 4 * N; }
#else
        tile3(xm, ldx, wp, ym, N, kl, cols, first);
#endif
      if (r == 3) tile3(xm, ldx, wp, ym, N, kl, cols, first);
      else if (r == 2) tile2(xm, ldx, wp, ym, N, kl, cols, first);
      else if (r == 1) tile1(xm, ldx, wp, ym, N, kl, cols, first);
    }
  }
  free(xc);
  return 0;
}
