// Fused causal GQA attention for x86-64 CPUs, as XLA FFI custom calls: bf16 on
// AMX tiles, float32 with AVX-512.
//
// Why: on XLA:CPU the attention of the baseline model is a chain of separate
// ops over (query rows x keys) tiles too large for the cache, so its softmax
// passes are memory-bound and its 64-wide dots run far below the machine's
// matmul speed (docs/BENCHMARKS.md). Here one call does a whole block of 64
// query rows (scores, softmax, value product; backward, all five products)
// while the block stays in L2. golfjax/model/fused_attention.py builds this
// file with the system's C++ compiler on first use and falls back to the XLA
// path wherever it cannot (no compiler, no AVX-512 / AMX, other shapes).
//
// Layout: the model's, row-major: q, o, dq (B, T, H, D); k, v, dk, dv
// (B, T, KV, D). Internally a KV head's G = H / KV query heads are the rows of
// one matrix, position-major (row r is head kv * G + r % G at position r / G).
// Arithmetic follows golfjax.model.cpu_ops.causal_attention: q scaled by
// 1/sqrt(D) in float32 (then rounded to the input type), float32 scores,
// softmax and accumulation, the normalised probabilities rounded to the input
// type before the value product. The backward recomputes the probabilities
// from the forward's row max and inverse row sum (bit-identical to the
// forward's).

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bf16 = uint16_t;
constexpr int kMaxBlockRows = 64;  // query rows per block: 64, or 32 where the rows are not a multiple of 64
constexpr int kKeyAlign = 32;   // keys are processed in multiples of this

// ---------------------------------------------------------------- AMX setup

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-7: 16 rows of 64 bytes. A constant in memory, not a stack variable filled before
// ldtilecfg: a compiler may not see that instruction read the stores (a build whose
// configure call sat behind a runtime branch faulted on its tile loads).
alignas(64) constexpr TileConfig kTileConfig = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

void configure_tiles() {
  asm volatile("" ::: "memory");
  _tile_loadconfig(&kTileConfig);
}

bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
  const bool avx512f = b & (1u << 16), avx512bw = b & (1u << 30);
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool avx512_bf16 = a & (1u << 5);
  return amx_bf16 && amx_tile && avx512f && avx512bw && avx512_bf16;
}

bool cpu_has_avx512f() {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 16));
}

bool request_amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// ---------------------------------------------------------------- products

// C (M x N, float32, row stride ldc) = or += A (M x K, bf16, row stride lda)
// times B, where B (K x N) is given in AMX's pair layout: element (k, n) at
// bp[(k / 2) * 2 * ldb + 2 * n + k % 2]. M, N and K multiples of 32.
void matmul(const bf16* a, int lda, const bf16* bp, int ldb, float* c, int ldc, int m_size, int n_size,
            int k_size, bool accumulate) {
  for (int m = 0; m < m_size; m += 32) {
    for (int n = 0; n < n_size; n += 32) {
      float* c0 = c + m * ldc + n;
      float* c1 = c0 + 16 * ldc;
      if (accumulate) {
        _tile_loadd(0, c0, ldc * 4);
        _tile_loadd(1, c0 + 16, ldc * 4);
        _tile_loadd(2, c1, ldc * 4);
        _tile_loadd(3, c1 + 16, ldc * 4);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int k = 0; k < k_size; k += 32) {
        _tile_loadd(4, a + m * lda + k, lda * 2);
        _tile_loadd(5, a + (m + 16) * lda + k, lda * 2);
        const bf16* b0 = bp + (k / 2) * 2 * ldb + 2 * n;
        _tile_loadd(6, b0, ldb * 4);
        _tile_loadd(7, b0 + 32, ldb * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c0, ldc * 4);
      _tile_stored(1, c0 + 16, ldc * 4);
      _tile_stored(2, c1, ldc * 4);
      _tile_stored(3, c1 + 16, ldc * 4);
    }
  }
}

// x (rows x cols, row stride ld) as the pair layout of x itself (B = x).
void pack_pairs(const bf16* x, int ld, int rows, int cols, bf16* out) {
  for (int r = 0; r < rows; r += 2) {
    const bf16* x0 = x + r * ld;
    const bf16* x1 = x0 + ld;
    bf16* o = out + r * cols;
    for (int c = 0; c < cols; ++c) {
      o[2 * c] = x0[c];
      o[2 * c + 1] = x1[c];
    }
  }
}

// x (rows x cols, row stride ld) as the pair layout of x^T (B = x^T, cols x rows):
// the pairs are adjacent elements of a row of x, so this is a 32-bit transpose.
// ld_out: the pair layout's row stride in columns (pair rows are 2 * ld_out apart).
void pack_pairs_transposed(const bf16* x, int ld, int rows, int cols, bf16* out, int ld_out) {
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(x);
  uint32_t* o32 = reinterpret_cast<uint32_t*>(out);
  for (int c = 0; c < cols / 2; ++c)
    for (int r = 0; r < rows; ++r) o32[size_t(c) * ld_out + r] = x32[r * (ld / 2) + c];
}

// x^T (cols x rows) of x (rows x cols, row stride ld).
void transpose(const bf16* x, int ld, int rows, int cols, bf16* out) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) out[c * rows + r] = x[r * ld + c];
}

// ---------------------------------------------------------------- elementwise

// exp(x) for x <= 0 (and anything not far above): Cephes' range reduction and
// degree-6 polynomial, 2^n applied by scalef so that underflow goes smoothly to 0.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int remaining) {
  return remaining >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << remaining) - 1);
}

inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

inline __m512 from_bf16(const bf16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Probabilities of one score row (valid keys [0, n), stored up to `width`):
// row max, exp (kept in s), sum, normalise, round to bf16; also (max, 1/sum).
void softmax_row(float* s, int n, int width, bf16* p, float* max_out, float* inv_out) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < n; j += 16) vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, tail_mask(n - j), s + j));
  const float m = _mm512_reduce_max_ps(vmax);
  const __m512 vm = _mm512_set1_ps(m);
  __m512 vsum = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 t = tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(t, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, s + j), vm)));
    _mm512_mask_storeu_ps(s + j, t, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int j = 0; j < width; j += 16) {
    const __mmask16 t = j < n ? tail_mask(n - j) : __mmask16(0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_bf16(_mm512_maskz_mul_ps(t, _mm512_maskz_loadu_ps(t, s + j), vinv)));
  }
  *max_out = m;
  *inv_out = inv;
}

// The same probabilities from a known row max and inverse sum (the backward).
void probabilities_row(const float* s, int n, int width, float m, float inv, bf16* p) {
  const __m512 vm = _mm512_set1_ps(m), vinv = _mm512_set1_ps(inv);
  for (int j = 0; j < width; j += 16) {
    const __mmask16 t = j < n ? tail_mask(n - j) : __mmask16(0);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, s + j), vm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_bf16(_mm512_maskz_mul_ps(t, e, vinv)));
  }
}

// Interleave rows r and r + 1 of x (bf16, row stride ld) into the pair layout row r / 2.
void interleave_row_pair(const bf16* x0, const bf16* x1, int width, bf16* out) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                      37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23,
                                      54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int j = 0; j < width; j += 32) {
    const __m512i a = _mm512_loadu_si512(x0 + j), b = _mm512_loadu_si512(x1 + j);
    _mm512_storeu_si512(out + 2 * j, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_storeu_si512(out + 2 * j + 32, _mm512_permutex2var_epi16(a, hi, b));
  }
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Row stride of a transposed (D x T) K or V and of the dK^T / dV^T accumulators: T plus 16
// elements, so that a product's walk down their rows does not stay in one L1 set (T = 1,024
// is a 4 KiB stride in float32 and in bf16 pairs).
inline int padded(int t) { return t + 16; }

// ---------------------------------------------------------------- one (batch, KV head)

// The arrays in the model's layout: q, o, dq (B, T, H, D); k, v, dk, dv (B, T, KV, D);
// the row statistics (B, KV, R) with R = T * G rows per KV head, position-major: row r
// is query head kv * G + r % G at position r / G (GQA without repeating K and V).
struct Shape {
  int batch, seq, heads, kv_heads, dim;
  int group() const { return heads / kv_heads; }
  int rows() const { return seq * group(); }
  int block() const { return rows() % kMaxBlockRows == 0 ? kMaxBlockRows : 32; }
  // Keys a block of rows [r0, r0 + block) needs: up to its last position, rounded up.
  int keys_for(int r0) const { return std::min(seq, round_up((r0 + block() - 1) / group() + 1, kKeyAlign)); }
  float scale() const { return float(1.0 / std::sqrt(double(dim))); }
};

struct Unit {  // one (batch, KV head): where its rows and keys live
  const Shape& sh;
  int b, kv;
  size_t row_offset(int r) const {
    const int g = sh.group();
    return ((size_t(b) * sh.seq + r / g) * sh.heads + size_t(kv) * g + r % g) * sh.dim;
  }
  size_t key_offset() const { return (size_t(b) * sh.seq * sh.kv_heads + kv) * sh.dim; }
  int key_stride() const { return sh.kv_heads * sh.dim; }
  size_t stat_offset() const { return (size_t(b) * sh.kv_heads + kv) * sh.rows(); }
};

// Rows [r0, r0 + n) of a (B, T, H, D) array as a contiguous (n x D) block, times `scale`
// in float32 and rounded back to bf16 when scale != 1 (as the XLA path scales q).
void gather_rows(const Unit& u, const bf16* x, int r0, int n, float scale, bf16* out) {
  const int D = u.sh.dim;
  const __m512 vs = _mm512_set1_ps(scale);
  for (int i = 0; i < n; ++i) {
    const bf16* src = x + u.row_offset(r0 + i);
    bf16* dst = out + i * D;
    if (scale == 1.0f) {
      std::memcpy(dst, src, sizeof(bf16) * D);
    } else {
      for (int d = 0; d < D; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), to_bf16(_mm512_mul_ps(from_bf16(src + d, 0xFFFF), vs)));
    }
  }
}

// Rows [r0, r0 + n) of a float32 (n x D) block, times `scale`, into a (B, T, H, D) bf16 array.
void scatter_rows(const Unit& u, const float* x, int r0, int n, float scale, bf16* out) {
  const int D = u.sh.dim;
  const __m512 vs = _mm512_set1_ps(scale);
  for (int i = 0; i < n; ++i) {
    bf16* dst = out + u.row_offset(r0 + i);
    for (int d = 0; d < D; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), to_bf16(_mm512_mul_ps(_mm512_loadu_ps(x + i * D + d), vs)));
  }
}

// A float32 (D x T, row stride ld) accumulator, transposed and rounded, into a (B, T, KV, D) bf16 array.
void scatter_keys_transposed(const Unit& u, const float* xt, int ld, bf16* out) {
  const int T = u.sh.seq, D = u.sh.dim;
  bf16* base = out + u.key_offset();
  alignas(64) float row[512];
  for (int t = 0; t < T; ++t) {
    for (int d = 0; d < D; ++d) row[d] = xt[size_t(d) * ld + t];
    bf16* dst = base + size_t(t) * u.key_stride();
    for (int d = 0; d < D; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), to_bf16(_mm512_load_ps(row + d)));
  }
}

// Per-thread scratch, kept between calls (XLA's pool threads persist): fresh 100+ KB
// vectors per call would each be a new mmap, zeroed page by page.
struct Workspace {
  std::vector<bf16> kt, vt, kp, qb, dob, ob, p, ds, p_pairs, ds_pairs, qt, dot;
  std::vector<float> s, dp, acc, dkt, dvt;
};

Workspace& workspace() {
  static thread_local Workspace ws;
  return ws;
}

template <typename T>
T* sized(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

void forward_unit(const Unit& u, const bf16* q, const bf16* k, const bf16* v, bf16* o, float* row_max,
                  float* row_inv) {
  const Shape& sh = u.sh;
  const int T = sh.seq, D = sh.dim, G = sh.group(), B = sh.block();
  Workspace& ws = workspace();
  const int ldt = padded(T);
  bf16 *kt = sized(ws.kt, ldt * D), *vp = sized(ws.kp, T * D), *qb = sized(ws.qb, B * D), *p = sized(ws.p, B * T);
  float *s = sized(ws.s, B * T), *acc = sized(ws.acc, B * D);
  pack_pairs_transposed(k + u.key_offset(), u.key_stride(), T, D, kt, ldt);  // B = K^T (D x T)
  pack_pairs(v + u.key_offset(), u.key_stride(), T, D, vp);             // B = V (T x D)
  row_max += u.stat_offset();
  row_inv += u.stat_offset();
  for (int r0 = 0; r0 < sh.rows(); r0 += B) {
    const int keys = sh.keys_for(r0);
    gather_rows(u, q, r0, B, sh.scale(), qb);
    matmul(qb, D, kt, ldt, s, keys, B, keys, D, false);
    for (int i = 0; i < B; ++i) {
      const int r = r0 + i;
      softmax_row(s + i * keys, r / G + 1, keys, p + i * keys, row_max + r, row_inv + r);
    }
    matmul(p, keys, vp, D, acc, D, B, D, keys, false);
    scatter_rows(u, acc, r0, B, 1.0f, o);
  }
}

void backward_unit(const Unit& u, const bf16* q, const bf16* k, const bf16* v, const bf16* o, const bf16* dout,
                   const float* row_max, const float* row_inv, bf16* dq, bf16* dk, bf16* dv) {
  const Shape& sh = u.sh;
  const int T = sh.seq, D = sh.dim, G = sh.group(), B = sh.block();
  Workspace& ws = workspace();
  const int ldt = padded(T);
  bf16 *kt = sized(ws.kt, ldt * D), *vt = sized(ws.vt, ldt * D), *kp = sized(ws.kp, T * D);
  bf16 *qb = sized(ws.qb, B * D), *dob = sized(ws.dob, B * D), *ob = sized(ws.ob, B * D);
  bf16 *p = sized(ws.p, B * T), *ds = sized(ws.ds, B * T), *p_pairs = sized(ws.p_pairs, B * T);
  bf16 *ds_pairs = sized(ws.ds_pairs, B * T), *qt = sized(ws.qt, D * B), *dot_ = sized(ws.dot, D * B);
  float *s = sized(ws.s, B * T), *dp = sized(ws.dp, B * T), *dqb = sized(ws.acc, B * D);
  float *dkt = sized(ws.dkt, size_t(D) * ldt), *dvt = sized(ws.dvt, size_t(D) * ldt);
  std::fill(dkt, dkt + size_t(D) * ldt, 0.0f);
  std::fill(dvt, dvt + size_t(D) * ldt, 0.0f);
  pack_pairs_transposed(k + u.key_offset(), u.key_stride(), T, D, kt, ldt);  // B = K^T, for the scores
  pack_pairs_transposed(v + u.key_offset(), u.key_stride(), T, D, vt, ldt);  // B = V^T, for dP = dO V^T
  pack_pairs(k + u.key_offset(), u.key_stride(), T, D, kp);             // B = K, for dQ = dS K
  row_max += u.stat_offset();
  row_inv += u.stat_offset();
  for (int r0 = 0; r0 < sh.rows(); r0 += B) {
    const int keys = sh.keys_for(r0);
    gather_rows(u, q, r0, B, sh.scale(), qb);
    gather_rows(u, dout, r0, B, 1.0f, dob);
    gather_rows(u, o, r0, B, 1.0f, ob);
    matmul(qb, D, kt, ldt, s, keys, B, keys, D, false);
    matmul(dob, D, vt, ldt, dp, keys, B, keys, D, false);
    for (int i = 0; i < B; ++i) {
      const int r = r0 + i, n = r / G + 1;
      bf16* pi = p + i * keys;
      probabilities_row(s + i * keys, n, keys, row_max[r], row_inv[r], pi);
      // delta = dO . O of this row, in float32
      __m512 vd = _mm512_setzero_ps();
      for (int d = 0; d < D; d += 16)
        vd = _mm512_fmadd_ps(from_bf16(dob + i * D + d, 0xFFFF), from_bf16(ob + i * D + d, 0xFFFF), vd);
      const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(vd));
      const float* dpi = dp + i * keys;
      bf16* dsi = ds + i * keys;
      for (int j = 0; j < keys; j += 16) {
        const __m512 g = _mm512_mul_ps(from_bf16(pi + j, 0xFFFF), _mm512_sub_ps(_mm512_loadu_ps(dpi + j), delta));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsi + j), to_bf16(g));
      }
    }
    for (int i = 0; i < B; i += 2) {
      interleave_row_pair(p + i * keys, p + (i + 1) * keys, keys, p_pairs + i * keys);
      interleave_row_pair(ds + i * keys, ds + (i + 1) * keys, keys, ds_pairs + i * keys);
    }
    matmul(ds, keys, kp, D, dqb, D, B, D, keys, false);  // dQ = dS K
    scatter_rows(u, dqb, r0, B, sh.scale(), dq);
    transpose(qb, D, B, D, qt);
    transpose(dob, D, B, D, dot_);
    matmul(qt, B, ds_pairs, keys, dkt, ldt, D, keys, B, true);   // dK^T += Q^T dS
    matmul(dot_, B, p_pairs, keys, dvt, ldt, D, keys, B, true);  // dV^T += dO^T P
  }
  scatter_keys_transposed(u, dkt, ldt, dk);
  scatter_keys_transposed(u, dvt, ldt, dv);
}

// ---------------------------------------------------------------- float32 (AVX-512)

// C (M x N) = or += A (M x K) B (K x N), float32, B row-major (row stride ldb). A is
// row-major (A(i, k) at a[i * lda + k]) or, with kTransA, given as A^T (a[k * lda + i]).
// M a multiple of 8, N of 32. 8 x 32 register tile: 16 accumulators, B rows as vectors,
// A elements broadcast.
template <bool kTransA>
void matmul_f32(const float* a, int lda, const float* b, int ldb, float* c, int ldc, int m_size, int n_size,
                int k_size, bool accumulate) {
  for (int m = 0; m < m_size; m += 8) {
    for (int n = 0; n < n_size; n += 32) {
      __m512 acc[8][2];
      for (int i = 0; i < 8; ++i) {
        acc[i][0] = accumulate ? _mm512_loadu_ps(c + (m + i) * ldc + n) : _mm512_setzero_ps();
        acc[i][1] = accumulate ? _mm512_loadu_ps(c + (m + i) * ldc + n + 16) : _mm512_setzero_ps();
      }
      for (int k = 0; k < k_size; ++k) {
        const __m512 b0 = _mm512_loadu_ps(b + k * ldb + n), b1 = _mm512_loadu_ps(b + k * ldb + n + 16);
        for (int i = 0; i < 8; ++i) {
          const __m512 ai = _mm512_set1_ps(kTransA ? a[k * lda + m + i] : a[(m + i) * lda + k]);
          acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
      }
      for (int i = 0; i < 8; ++i) {
        _mm512_storeu_ps(c + (m + i) * ldc + n, acc[i][0]);
        _mm512_storeu_ps(c + (m + i) * ldc + n + 16, acc[i][1]);
      }
    }
  }
}

// x (rows x cols, row stride ld) transposed into out (cols x rows, row stride ld_out).
void transpose_f32(const float* x, int ld, int rows, int cols, float* out, int ld_out) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) out[c * ld_out + r] = x[r * ld + c];
}


// Probabilities of one float32 score row, in place: row max, exp, sum, normalise.
void softmax_row_f32(float* s, int n, int width, float* max_out, float* inv_out) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < n; j += 16) vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, tail_mask(n - j), s + j));
  const float m = _mm512_reduce_max_ps(vmax);
  const __m512 vm = _mm512_set1_ps(m);
  __m512 vsum = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 t = tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(t, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, s + j), vm)));
    _mm512_mask_storeu_ps(s + j, t, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int j = 0; j < width; j += 16) {
    const __mmask16 t = j < n ? tail_mask(n - j) : __mmask16(0);
    _mm512_storeu_ps(s + j, _mm512_maskz_mul_ps(t, _mm512_maskz_loadu_ps(t, s + j), vinv));
  }
  *max_out = m;
  *inv_out = inv;
}

void gather_rows_f32(const Unit& u, const float* x, int r0, int n, float scale, float* out) {
  const int D = u.sh.dim;
  const __m512 vs = _mm512_set1_ps(scale);
  for (int i = 0; i < n; ++i) {
    const float* src = x + u.row_offset(r0 + i);
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(out + i * D + d, _mm512_mul_ps(_mm512_loadu_ps(src + d), vs));
  }
}

void scatter_rows_f32(const Unit& u, const float* x, int r0, int n, float scale, float* out) {
  const int D = u.sh.dim;
  const __m512 vs = _mm512_set1_ps(scale);
  for (int i = 0; i < n; ++i) {
    float* dst = out + u.row_offset(r0 + i);
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(x + i * D + d), vs));
  }
}

struct WorkspaceF32 {
  std::vector<float> kt, vt, qb, dob, ob, s, dp, acc, dk, dv;
};

WorkspaceF32& workspace_f32() {
  static thread_local WorkspaceF32 ws;
  return ws;
}

void forward_unit_f32(const Unit& u, const float* q, const float* k, const float* v, float* o, float* row_max,
                      float* row_inv) {
  const Shape& sh = u.sh;
  const int T = sh.seq, D = sh.dim, G = sh.group(), B = sh.block();
  WorkspaceF32& ws = workspace_f32();
  const int ldt = padded(T);
  float *kt = sized(ws.kt, size_t(ldt) * D), *qb = sized(ws.qb, B * D), *s = sized(ws.s, size_t(B) * T);
  float* acc = sized(ws.acc, B * D);
  transpose_f32(k + u.key_offset(), u.key_stride(), T, D, kt, ldt);  // K^T (D x T)
  const float* vu = v + u.key_offset();
  row_max += u.stat_offset();
  row_inv += u.stat_offset();
  for (int r0 = 0; r0 < sh.rows(); r0 += B) {
    const int keys = sh.keys_for(r0);
    gather_rows_f32(u, q, r0, B, sh.scale(), qb);
    matmul_f32<false>(qb, D, kt, ldt, s, keys, B, keys, D, false);
    for (int i = 0; i < B; ++i) {
      const int r = r0 + i;
      softmax_row_f32(s + i * keys, r / G + 1, keys, row_max + r, row_inv + r);
    }
    matmul_f32<false>(s, keys, vu, u.key_stride(), acc, D, B, D, keys, false);
    scatter_rows_f32(u, acc, r0, B, 1.0f, o);
  }
}

void backward_unit_f32(const Unit& u, const float* q, const float* k, const float* v, const float* o,
                       const float* dout, const float* row_max, const float* row_inv, float* dq, float* dk,
                       float* dv) {
  const Shape& sh = u.sh;
  const int T = sh.seq, D = sh.dim, G = sh.group(), B = sh.block();
  WorkspaceF32& ws = workspace_f32();
  const int ldt = padded(T);
  float *kt = sized(ws.kt, size_t(ldt) * D), *vt = sized(ws.vt, size_t(ldt) * D);
  float *qb = sized(ws.qb, B * D), *dob = sized(ws.dob, B * D), *ob = sized(ws.ob, B * D);
  float *s = sized(ws.s, size_t(B) * T), *dp = sized(ws.dp, size_t(B) * T), *dqb = sized(ws.acc, B * D);
  float *dka = sized(ws.dk, size_t(T) * D), *dva = sized(ws.dv, size_t(T) * D);
  std::fill(dka, dka + size_t(T) * D, 0.0f);
  std::fill(dva, dva + size_t(T) * D, 0.0f);
  const float* ku = k + u.key_offset();
  transpose_f32(ku, u.key_stride(), T, D, kt, ldt);                  // K^T, for the scores
  transpose_f32(v + u.key_offset(), u.key_stride(), T, D, vt, ldt);  // V^T, for dP = dO V^T
  row_max += u.stat_offset();
  row_inv += u.stat_offset();
  for (int r0 = 0; r0 < sh.rows(); r0 += B) {
    const int keys = sh.keys_for(r0);
    gather_rows_f32(u, q, r0, B, sh.scale(), qb);
    gather_rows_f32(u, dout, r0, B, 1.0f, dob);
    gather_rows_f32(u, o, r0, B, 1.0f, ob);
    matmul_f32<false>(qb, D, kt, ldt, s, keys, B, keys, D, false);
    matmul_f32<false>(dob, D, vt, ldt, dp, keys, B, keys, D, false);
    for (int i = 0; i < B; ++i) {
      const int r = r0 + i, n = r / G + 1;
      float* si = s + i * keys;  // scores, then probabilities
      const __m512 vm = _mm512_set1_ps(row_max[r]), vinv = _mm512_set1_ps(row_inv[r]);
      __m512 vd = _mm512_setzero_ps();
      for (int d = 0; d < D; d += 16)
        vd = _mm512_fmadd_ps(_mm512_loadu_ps(dob + i * D + d), _mm512_loadu_ps(ob + i * D + d), vd);
      const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(vd));
      float* dpi = dp + i * keys;  // dP, then dS
      for (int j = 0; j < keys; j += 16) {
        const __mmask16 t = j < n ? tail_mask(n - j) : __mmask16(0);
        const __m512 p = _mm512_maskz_mul_ps(t, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, si + j), vm)), vinv);
        _mm512_storeu_ps(si + j, p);
        _mm512_storeu_ps(dpi + j, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dpi + j), delta)));
      }
    }
    matmul_f32<false>(dp, keys, ku, u.key_stride(), dqb, D, B, D, keys, false);  // dQ = dS K
    scatter_rows_f32(u, dqb, r0, B, sh.scale(), dq);
    matmul_f32<true>(dp, keys, qb, D, dka, D, keys, D, B, true);   // dK += dS^T Q
    matmul_f32<true>(s, keys, dob, D, dva, D, keys, D, B, true);   // dV += P^T dO
  }
  for (int t = 0; t < T; ++t) {
    std::memcpy(dk + u.key_offset() + size_t(t) * u.key_stride(), dka + size_t(t) * D, sizeof(float) * D);
    std::memcpy(dv + u.key_offset() + size_t(t) * u.key_stride(), dva + size_t(t) * D, sizeof(float) * D);
  }
}

// ---------------------------------------------------------------- transpose

// out (..., n, m) = the last two axes of x (..., m, n) swapped, in 32 x 32 tiles. As a
// custom call its operand is row-major, so the producer of x (the MLP's relu^2, say) is
// not rewritten to write column-major, which XLA:CPU does with a transpose it can lay
// out freely (8x slower at 1024 x 1024 float32).
template <typename T>
void transpose_tiles(const T* x, int m, int n, T* out, int r0, int r1) {
  constexpr int kTile = 32;
  for (int i0 = r0; i0 < r1; i0 += kTile)
    for (int j0 = 0; j0 < n; j0 += kTile)
      for (int j = j0; j < std::min(n, j0 + kTile); ++j)
        for (int i = i0; i < std::min(r1, i0 + kTile); ++i) out[size_t(j) * m + i] = x[size_t(i) * n + j];
}

// ---------------------------------------------------------------- q/k RMSNorm, rotary, gain

// What the model does to q and k between their projections and the attention:
// y = gain[h] * rotary(rms_norm(x)), per (position, head) row of D values. As
// separate XLA:CPU ops (square, reduce, multiplies, the rotary's slices and
// concatenate, each forward and backward) it took ~12% of a bf16 train step for
// ~0% of its FLOPs; here it is one pass over x. Arithmetic in float32, rounded to
// the input type once at the end (XLA's chain rounds after each op in bf16).
// The rotary turns pairs (i, i + R/2) of the first R = 2 * cos.shape[-1] dims by
// the position's angles (the reference's halves convention); dims past R pass.

inline float widen(float x) { return x; }
inline float widen(bf16 x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void narrow(float v, float* p) { *p = v; }
inline void narrow(float v, bf16* p) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    *p = bf16((u >> 16) | 0x40);
    return;
  }
  *p = bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

struct NormRotaryShape {
  int positions, seq, heads, dim, half;  // positions = B * T; half = R / 2
};

ffi::ErrorOr<NormRotaryShape> norm_rotary_shape(ffi::AnyBuffer x, ffi::AnyBuffer cos, ffi::AnyBuffer sin,
                                                ffi::AnyBuffer gain) {
  auto xd = x.dimensions(), cd = cos.dimensions(), sd = sin.dimensions(), gd = gain.dimensions();
  if (xd.size() != 4 || cd.size() != 2 || sd.size() != 2 || gd.size() != 1 || cd[0] != xd[1] || cd[0] != sd[0] ||
      cd[1] != sd[1] || gd[0] != xd[2] || 2 * cd[1] > xd[3] || xd[3] > 512)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "norm_rotary: x (B, T, H, D <= 512), cos and sin (T, R/2) with R <= D, gain (H,) expected"));
  return NormRotaryShape{int(xd[0] * xd[1]), int(xd[1]), int(xd[2]), int(xd[3]), int(cd[1])};
}

constexpr int kNormRotaryPositions = 32;  // positions per unit of work

// sum(a * b) in 16 independent lanes (a float sum in order would be one long dependency
// chain: it took most of this kernel's time).
inline float dot_lanes(const float* a, const float* b, int n) {
  float acc[16] = {};
  int d = 0;
  for (; d + 16 <= n; d += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[d + j] * b[d + j];
  float sum = 0.f;
  for (int j = 0; j < 16; ++j) sum += acc[j];
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// u = rotary(v * r) (no gain) for one row.
inline void rotate_row(const NormRotaryShape& s, const float* v, float r, const float* c, const float* sn, float* u) {
  for (int i = 0; i < s.half; ++i) {
    const float a = v[i] * r, b = v[i + s.half] * r;
    u[i] = a * c[i] + b * sn[i];
    u[i + s.half] = b * c[i] - a * sn[i];
  }
  for (int d = 2 * s.half; d < s.dim; ++d) u[d] = v[d] * r;
}

template <typename T>
void norm_rotary_forward_rows(const NormRotaryShape& s, int p0, int p1, const T* x, const float* cos,
                              const float* sin, const float* gain, float eps, T* y) {
  alignas(64) float v[512], u[512];
  for (int p = p0; p < p1; ++p) {
    const float* c = cos + size_t(p % s.seq) * s.half;
    const float* sn = sin + size_t(p % s.seq) * s.half;
    for (int h = 0; h < s.heads; ++h) {
      const size_t off = (size_t(p) * s.heads + h) * s.dim;
      for (int d = 0; d < s.dim; ++d) v[d] = widen(x[off + d]);
      const float r = 1.f / std::sqrt(dot_lanes(v, v, s.dim) / s.dim + eps), g = gain[h];
      rotate_row(s, v, r, c, sn, u);
      for (int d = 0; d < s.dim; ++d) narrow(u[d] * g, y + off + d);
    }
  }
}

// dx and this unit's dgain (H,) for rows p0..p1, recomputing the forward from x.
template <typename T>
void norm_rotary_backward_rows(const NormRotaryShape& s, int p0, int p1, const T* x, const float* cos,
                               const float* sin, const float* gain, float eps, const T* dy, T* dx, float* dgain) {
  alignas(64) float v[512], u[512], w[512], dn[512];
  for (int p = p0; p < p1; ++p) {
    const float* c = cos + size_t(p % s.seq) * s.half;
    const float* sn = sin + size_t(p % s.seq) * s.half;
    for (int h = 0; h < s.heads; ++h) {
      const size_t off = (size_t(p) * s.heads + h) * s.dim;
      for (int d = 0; d < s.dim; ++d) {
        v[d] = widen(x[off + d]);
        w[d] = widen(dy[off + d]);
      }
      const float r = 1.f / std::sqrt(dot_lanes(v, v, s.dim) / s.dim + eps), g = gain[h];
      rotate_row(s, v, r, c, sn, u);
      dgain[h] += dot_lanes(w, u, s.dim);  // y = g * u
      for (int i = 0; i < s.half; ++i) {  // the rotary's transpose of du = g * dy
        const float du1 = w[i] * g, du2 = w[i + s.half] * g;
        dn[i] = du1 * c[i] - du2 * sn[i];
        dn[i + s.half] = du1 * sn[i] + du2 * c[i];
      }
      for (int d = 2 * s.half; d < s.dim; ++d) dn[d] = w[d] * g;
      // n = v * r: dx = r * (dn - n * mean(dn * n))
      const float k = r * r * dot_lanes(dn, v, s.dim) / s.dim;
      for (int d = 0; d < s.dim; ++d) narrow(r * (dn[d] - v[d] * k), dx + off + d);
    }
  }
}

// ---------------------------------------------------------------- parallel over units

// body(u) for every unit, on the calling thread and on XLA's CPU thread pool. The caller
// never waits for a helper task to start (the pool may be busy, even with our caller):
// it claims units itself and waits only for units a running helper has claimed.
// kAmx: configure AMX tiles on each thread (bf16 kernels only: a CPU without AMX would
// fault on the tile instructions).
template <bool kAmx, typename F>
void for_each_unit(ffi::ThreadPool& pool, int units, F body) {
  struct Progress {
    std::atomic<int> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto work = [progress, units, body]() {
    if (progress->next.load() >= units) return;
    if constexpr (kAmx) configure_tiles();
    for (int u = progress->next.fetch_add(1); u < units; u = progress->next.fetch_add(1)) {
      body(u);
      progress->done.fetch_add(1);
    }
    if constexpr (kAmx) _tile_release();
  };
  const int64_t helpers = std::min<int64_t>(units, pool.num_threads()) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (progress->done.load() < units) std::this_thread::yield();
}

ffi::ErrorOr<Shape> shape_of(ffi::AnyBuffer q, ffi::AnyBuffer k) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3])
    return ffi::Unexpected(ffi::Error::InvalidArgument("amx attention: q (B, T, H, D) and k, v (B, T, KV, D) expected"));
  const Shape sh{int(qd[0]), int(qd[1]), int(qd[2]), int(kd[2]), int(qd[3])};
  if (sh.heads % sh.kv_heads || sh.dim % 32 || sh.dim > 512 || sh.seq % kKeyAlign)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "amx attention: heads must be a multiple of kv_heads, head_dim a multiple of 32 up to 512, seq of 32"));
  return sh;
}

template <typename T>
T* data(ffi::AnyBuffer x) { return static_cast<T*>(x.untyped_data()); }
template <typename T>
T* data(ffi::Result<ffi::AnyBuffer>& x) { return static_cast<T*>(x->untyped_data()); }

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> o,
                        ffi::Result<ffi::AnyBuffer> row_max, ffi::Result<ffi::AnyBuffer> row_inv) {
  auto sh = shape_of(q, k);
  if (sh.has_error()) return sh.error();
  for_each_unit<true>(pool, sh->batch * sh->kv_heads, [&](int i) {
    forward_unit(Unit{*sh, i / sh->kv_heads, i % sh->kv_heads}, data<const bf16>(q), data<const bf16>(k),
                 data<const bf16>(v), data<bf16>(o), data<float>(row_max), data<float>(row_inv));
  });
  return ffi::Error::Success();
}

ffi::Error backward_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer o, ffi::AnyBuffer dout,
                         ffi::AnyBuffer row_max, ffi::AnyBuffer row_inv, ffi::Result<ffi::AnyBuffer> dq,
                         ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv) {
  auto sh = shape_of(q, k);
  if (sh.has_error()) return sh.error();
  for_each_unit<true>(pool, sh->batch * sh->kv_heads, [&](int i) {
    backward_unit(Unit{*sh, i / sh->kv_heads, i % sh->kv_heads}, data<const bf16>(q), data<const bf16>(k),
                  data<const bf16>(v), data<const bf16>(o), data<const bf16>(dout), data<const float>(row_max),
                  data<const float>(row_inv), data<bf16>(dq), data<bf16>(dk), data<bf16>(dv));
  });
  return ffi::Error::Success();
}

ffi::Error forward_f32_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> row_max,
                            ffi::Result<ffi::AnyBuffer> row_inv) {
  auto sh = shape_of(q, k);
  if (sh.has_error()) return sh.error();
  for_each_unit<false>(pool, sh->batch * sh->kv_heads, [&](int i) {
    forward_unit_f32(Unit{*sh, i / sh->kv_heads, i % sh->kv_heads}, data<const float>(q), data<const float>(k),
                     data<const float>(v), data<float>(o), data<float>(row_max), data<float>(row_inv));
  });
  return ffi::Error::Success();
}

ffi::Error backward_f32_impl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                             ffi::AnyBuffer o, ffi::AnyBuffer dout, ffi::AnyBuffer row_max, ffi::AnyBuffer row_inv,
                             ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                             ffi::Result<ffi::AnyBuffer> dv) {
  auto sh = shape_of(q, k);
  if (sh.has_error()) return sh.error();
  for_each_unit<false>(pool, sh->batch * sh->kv_heads, [&](int i) {
    backward_unit_f32(Unit{*sh, i / sh->kv_heads, i % sh->kv_heads}, data<const float>(q), data<const float>(k),
                      data<const float>(v), data<const float>(o), data<const float>(dout),
                      data<const float>(row_max), data<const float>(row_inv), data<float>(dq), data<float>(dk),
                      data<float>(dv));
  });
  return ffi::Error::Success();
}

template <typename T>
ffi::Error transpose_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  auto d = x.dimensions();
  if (d.size() < 2) return ffi::Error::InvalidArgument("transpose: a matrix or a stack of them expected");
  const int m = int(d[d.size() - 2]), n = int(d[d.size() - 1]);
  size_t batch = 1;
  for (size_t i = 0; i + 2 < d.size(); ++i) batch *= size_t(d[i]);
  const int bands = std::max(1, (m + 255) / 256);  // units of work: 256-row bands of each matrix
  const T* xp = data<const T>(x);
  T* op = data<T>(out);
  for_each_unit<false>(pool, int(batch * bands), [&](int u) {
    const size_t b = size_t(u) / bands;
    const int band = u % bands, r0 = band * 256, r1 = std::min(m, r0 + 256);
    transpose_tiles(xp + b * m * n, m, n, op + b * m * n, r0, r1);
  });
  return ffi::Error::Success();
}

template <typename T>
ffi::Error norm_rotary_forward_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer cos, ffi::AnyBuffer sin,
                                    ffi::AnyBuffer gain, float eps, ffi::Result<ffi::AnyBuffer> y) {
  auto s = norm_rotary_shape(x, cos, sin, gain);
  if (s.has_error()) return s.error();
  const int units = (s->positions + kNormRotaryPositions - 1) / kNormRotaryPositions;
  for_each_unit<false>(pool, units, [&](int u) {
    const int p0 = u * kNormRotaryPositions, p1 = std::min(s->positions, p0 + kNormRotaryPositions);
    norm_rotary_forward_rows(*s, p0, p1, data<const T>(x), data<const float>(cos), data<const float>(sin),
                             data<const float>(gain), eps, data<T>(y));
  });
  return ffi::Error::Success();
}

template <typename T>
ffi::Error norm_rotary_backward_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer cos, ffi::AnyBuffer sin,
                                     ffi::AnyBuffer gain, ffi::AnyBuffer dy, float eps,
                                     ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dgain) {
  auto s = norm_rotary_shape(x, cos, sin, gain);
  if (s.has_error()) return s.error();
  const int units = (s->positions + kNormRotaryPositions - 1) / kNormRotaryPositions;
  std::vector<float> partial(size_t(units) * s->heads, 0.f);  // per unit, so the sum's order is fixed
  for_each_unit<false>(pool, units, [&](int u) {
    const int p0 = u * kNormRotaryPositions, p1 = std::min(s->positions, p0 + kNormRotaryPositions);
    norm_rotary_backward_rows(*s, p0, p1, data<const T>(x), data<const float>(cos), data<const float>(sin),
                              data<const float>(gain), eps, data<const T>(dy), data<T>(dx),
                              partial.data() + size_t(u) * s->heads);
  });
  float* dg = data<float>(dgain);
  for (int h = 0; h < s->heads; ++h) {
    float acc = 0.f;
    for (int u = 0; u < units; ++u) acc += partial[size_t(u) * s->heads + h];
    dg[h] = acc;
  }
  return ffi::Error::Success();
}

}  // namespace

// Bit 0: the float32 kernels can run (AVX-512F); bit 1: the bf16 ones (AMX-BF16, AVX512-BF16,
// and the kernel's permission to use AMX tile data).
extern "C" int golfjax_cpu_features() {
  int features = cpu_has_avx512f() ? 1 : 0;
  if (cpu_has_amx_bf16() && request_amx_permission()) features |= 2;
  return features;
}

// The handlers' signatures. Attention forward: q, k, v -> o, row max, row inverse sum;
// backward: q, k, v, o, dO, row max, row inverse sum -> dq, dk, dv.
#define GOLFJAX_ARGS3 .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
#define GOLFJAX_RETS3 .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
#define GOLFJAX_ATTENTION_FWD ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() GOLFJAX_ARGS3 GOLFJAX_RETS3
#define GOLFJAX_ATTENTION_BWD \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() GOLFJAX_ARGS3 GOLFJAX_ARGS3.Arg<ffi::AnyBuffer>() GOLFJAX_RETS3
// norm_rotary forward: x, cos, sin, gain -> y; backward: x, cos, sin, gain, dy -> dx, dgain
#define GOLFJAX_NORM_ROTARY_FWD \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() GOLFJAX_ARGS3.Arg<ffi::AnyBuffer>().Attr<float>("eps").Ret<ffi::AnyBuffer>()
#define GOLFJAX_NORM_ROTARY_BWD                                                                            \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() GOLFJAX_ARGS3.Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Attr<float>( \
      "eps").Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(golfjax_attention_fwd_bf16, forward_impl, GOLFJAX_ATTENTION_FWD);
XLA_FFI_DEFINE_HANDLER_SYMBOL(golfjax_attention_bwd_bf16, backward_impl, GOLFJAX_ATTENTION_BWD);
XLA_FFI_DEFINE_HANDLER_SYMBOL(golfjax_attention_fwd_f32, forward_f32_impl, GOLFJAX_ATTENTION_FWD);
XLA_FFI_DEFINE_HANDLER_SYMBOL(golfjax_attention_bwd_f32, backward_f32_impl, GOLFJAX_ATTENTION_BWD);
XLA_FFI_DEFINE_HANDLER_SYMBOL(golfjax_norm_rotary_fwd_bf16, norm_rotary_forward_impl<bf16>, GOLFJAX_NORM_ROTARY_FWD);
XLA_FFI_DEFINE_HANDLER_SYMBOL(golfjax_norm_rotary_bwd_bf16, norm_rotary_backward_impl<bf16>, GOLFJAX_NORM_ROTARY_BWD);
XLA_FFI_DEFINE_HANDLER_SYMBOL(golfjax_norm_rotary_fwd_f32, norm_rotary_forward_impl<float>, GOLFJAX_NORM_ROTARY_FWD);
XLA_FFI_DEFINE_HANDLER_SYMBOL(golfjax_norm_rotary_bwd_f32, norm_rotary_backward_impl<float>, GOLFJAX_NORM_ROTARY_BWD);

// transpose: x -> x with its last two axes swapped
#define GOLFJAX_TRANSPOSE ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(golfjax_transpose_f32, transpose_impl<float>, GOLFJAX_TRANSPOSE);
XLA_FFI_DEFINE_HANDLER_SYMBOL(golfjax_transpose_16bit, transpose_impl<uint16_t>, GOLFJAX_TRANSPOSE);
