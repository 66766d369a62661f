// Fused causal grouped-query flash attention for CPU, called from JAX as XLA FFI custom calls.
//
// Semantics of longrope_jax/attention.py:dense_attention: key s is visible to query t iff
// k_pos[s] <= q_pos[t] (and q_pos[t] - k_pos[s] < window) (and q_seg[t] == k_seg[s], in the
// *Segments handlers); rows with no visible key give zeros.
// Shapes (leading dims before the last three are flattened into B, so vmap folds into the
// batch): q, out, dq [B, T, N, H]; k, v, dk, dv [B, S, K, H]; q_pos, q_seg [B, T]; k_pos, k_seg
// [B, S]; lse [B, N, T] (natural log, +inf where no key is visible); N = K * G.
//
// One task is (b, kv head, query block) in the forward and (b, kv head, key block) in the
// backward; the G query heads of a kv head are stacked as rows (M = G * Q) so one matmul serves
// the whole group. Key blocks outside a query block's position range (or, with segments, whose
// segment-id range misses the query block's) are skipped, and only blocks straddling the causal
// edge (or the window edge, or more than one segment) are masked element by element. Segments
// are a template flag (kSeg): the handlers without them run the code without segment ids.
// Matmuls run on a register-tiled kernel written with GCC vector extensions (AVX-512, AVX or
// 128-bit vectors, whichever the build machine has): the B operand is packed into 64-column strips, the A operand is read in
// place (row-major or transposed), so no product needs a BLAS. On this project's 2-core Xeon it
// measured 15-30% above OpenBLAS sgemm single-threaded at these shapes (K = head dim or a key
// block). Tasks run on a pool with one thread per CPU the process may use; softmax is online, in
// base 2. Head dims that are not a whole number of vectors are zero-padded inside.

#include <sched.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ------------------------------------------------------------------------------ vectors
// One vector register: 16 floats with AVX-512 (32 registers), 8 with AVX (16 registers), else 4.
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegisters = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8, kRegisters = 16;
#else
constexpr int kLanes = 4, kRegisters = 16;
#endif
typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t IVec __attribute__((vector_size(4 * kLanes)));
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

typedef float UnalignedVec __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
inline Vec Load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
inline IVec LoadI(const int32_t* p) {
  IVec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Vec Splat(float x) { return x - Vec{}; }  // x - 0 is x exactly: a plain broadcast
inline IVec SplatI(int32_t x) { return IVec{} + x; }
inline Vec Max(Vec a, Vec b) { return a > b ? a : b; }
inline float HMax(Vec v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}
inline float HSum(Vec v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// 2^x to ~1 ulp for x <= 0 (softmax arguments): x = n + f with n an integer and |f| <= 1/2,
// 2^f by a degree-6 Taylor polynomial, times 2^n. x < -126 (and -inf) gives 0.
inline Vec Exp2Poly(Vec f) {
  Vec p = Splat(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  return p * f + 1.f;
}

#ifdef __AVX512F__
inline Vec Exp2(Vec x) {
  const __m512 xv = (__m512)x;
  const __m512 n = _mm512_roundscale_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 keep = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  const Vec p = Exp2Poly((Vec)_mm512_sub_ps(xv, n));
  return (Vec)_mm512_maskz_scalef_ps(keep, (__m512)p, n);
}
#else
inline Vec Exp2(Vec x) {
  x = Max(x, Splat(-127.f));
  x = x < Splat(127.f) ? x : Splat(127.f);
  const Vec magic = Splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (x + magic) - magic;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;  // 2^n; 0 for n = -127
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return Exp2Poly(x - n) * scale;
}
#endif

// ------------------------------------------------------------------------------ matmul
// c[i, j] (+)= sum_p a(i, p) * b[p, j] with a(i, p) = a[i * a_si + p * a_sp] (row-major or
// transposed A in place) and b packed by PackRows / PackTransposed: columns in strips of 64, strip
// s a row-major [k, w] block at b + 64 * s * k (w = 64 but for the last). n and every strip width
// are multiples of kLanes; c has room for n columns.
constexpr int kTileVecs = kRegisters >= 32 ? 4 : 2;  // vectors across a micro-tile
constexpr int64_t kStrip = 64;

template <int R, int NV, bool kAccumulate>
inline void MicroTile(int64_t k, const float* a, int64_t a_si, int64_t a_sp, const float* b,
                      int64_t ldb, float* c, int64_t ldc) {
  Vec acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = kAccumulate ? Load(c + r * ldc + kLanes * v) : Vec{};
  }
  for (int64_t p = 0; p < k; ++p) {
    Vec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Load(b + p * ldb + kLanes * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Vec x = Splat(a[r * a_si + p * a_sp]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Store(c + r * ldc + kLanes * v, acc[r][v]);
  }
}

// The last rows < R of a column strip, as one tile of exactly that many rows.
template <int R, int NV, bool kAccumulate>
inline void RemainderTile(int64_t rows, int64_t k, const float* a, int64_t a_si, int64_t a_sp,
                          const float* b, int64_t ldb, float* c, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows == R) {
      MicroTile<R, NV, kAccumulate>(k, a, a_si, a_sp, b, ldb, c, ldc);
    } else {
      RemainderTile<R - 1, NV, kAccumulate>(rows, k, a, a_si, a_sp, b, ldb, c, ldc);
    }
  }
}

template <int NV, bool kAccumulate>
void MatMulColumns(int64_t m, int64_t k, const float* a, int64_t a_si, int64_t a_sp,
                   const float* b, int64_t ldb, float* c, int64_t ldc) {
  // Rows: as many as the registers hold (R * NV accumulators, NV b vectors, one broadcast).
  constexpr int R = std::min(8, (kRegisters - NV - 1) / NV);
  int64_t i = 0;
  for (; i + R <= m; i += R) {
    MicroTile<R, NV, kAccumulate>(k, a + i * a_si, a_si, a_sp, b, ldb, c + i * ldc, ldc);
  }
  RemainderTile<R - 1, NV, kAccumulate>(m - i, k, a + i * a_si, a_si, a_sp, b, ldb, c + i * ldc,
                                        ldc);
}

template <int NV>
void MatMulColumns(int64_t m, int64_t k, const float* a, int64_t a_si, int64_t a_sp,
                   const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (accumulate) {
    MatMulColumns<NV, true>(m, k, a, a_si, a_sp, b, ldb, c, ldc);
  } else {
    MatMulColumns<NV, false>(m, k, a, a_si, a_sp, b, ldb, c, ldc);
  }
}

void MatMul(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_si, int64_t a_sp,
            const float* b, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j0 = 0; j0 < n; j0 += kStrip) {
    const int64_t w = std::min(kStrip, n - j0);
    const float* bs = b + j0 * k;
    for (int64_t v = 0; v < w / kLanes;) {
      const int64_t left = w / kLanes - v;
      const float* bv = bs + v * kLanes;
      float* cv = c + j0 + v * kLanes;
      if (kTileVecs >= 4 && left >= 4) {
        MatMulColumns<kTileVecs >= 4 ? 4 : 1>(m, k, a, a_si, a_sp, bv, w, cv, ldc, accumulate);
        v += 4;
      } else if (kTileVecs >= 2 && left >= 2) {
        MatMulColumns<2>(m, k, a, a_si, a_sp, bv, w, cv, ldc, accumulate);
        v += 2;
      } else {
        MatMulColumns<1>(m, k, a, a_si, a_sp, bv, w, cv, ldc, accumulate);
        v += 1;
      }
    }
  }
}

// Packs rows [k, n_src] of src (row stride ld) as b [k, n] (n a multiple of 16 >= n_src; the
// extra columns are 0).
void PackRows(const float* src, int64_t ld, int64_t k, int64_t n_src, int64_t n, float* b) {
  for (int64_t j0 = 0; j0 < n; j0 += kStrip) {
    const int64_t w = std::min(kStrip, n - j0);
    float* bs = b + j0 * k;
    for (int64_t p = 0; p < k; ++p) {
      const float* row = src + p * ld;
      for (int64_t j = 0; j < w; ++j) bs[p * w + j] = j0 + j < n_src ? row[j0 + j] : 0.f;
    }
  }
}

// Packs the transpose of src [n_src, k_src] (row stride ld) as b [k, n]: b[p, j] = src[j, p],
// 0 for j >= n_src or p >= k_src.
void PackTransposed(const float* src, int64_t ld, int64_t n_src, int64_t k_src, int64_t k,
                    int64_t n, float* b) {
  for (int64_t j0 = 0; j0 < n; j0 += kStrip) {
    const int64_t w = std::min(kStrip, n - j0);
    float* bs = b + j0 * k;
    for (int64_t j = 0; j < w; ++j) {
      const float* row = src + (j0 + j) * ld;
      const bool valid = j0 + j < n_src;
      for (int64_t p = 0; p < k; ++p) bs[p * w + j] = valid && p < k_src ? row[p] : 0.f;
    }
  }
}

// ------------------------------------------------------------------------------ thread pool
// Workers sleep on a condition variable (no spinning: the cores are XLA's between calls); the
// caller waits.
class Pool {
 public:
  explicit Pool(int num_threads) {
    for (int i = 0; i < num_threads; ++i) std::thread([this] { Work(); }).detach();
  }
  int size() const { return size_; }

  void Run(int64_t n, const std::function<void(int64_t)>& fn) {
    if (n <= 0) return;
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(job);
    }
    cv_.notify_all();
    std::unique_lock<std::mutex> lock(job->mu);
    job->cv.wait(lock, [&] { return job->done == job->n; });
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* fn;
    int64_t n;
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };

  void Work() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return !queue_.empty(); });
        job = queue_.front();
      }
      for (int64_t i; (i = job->next.fetch_add(1)) < job->n;) {
        (*job->fn)(i);
        std::lock_guard<std::mutex> lock(job->mu);
        if (++job->done == job->n) job->cv.notify_all();
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (!queue_.empty() && queue_.front() == job) queue_.pop_front();
    }
  }

  int size_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;

 public:
  static Pool& Get() {
    static Pool* pool = [] {
      cpu_set_t set;
      int n = 1;
      if (sched_getaffinity(0, sizeof(set), &set) == 0) n = std::max(1, CPU_COUNT(&set));
      Pool* p = new Pool(n);  // never destroyed: detached workers outlive static destructors
      p->size_ = n;
      return p;
    }();
    return *pool;
  }
};

// ------------------------------------------------------------------------------ problem
struct Problem {
  int64_t B, T, S, N, K, H, G;
  int32_t window;
  float scale;
  int64_t Q, C, Cp, Hp;  // query and key blocks; key block and head dim padded to whole vectors
  int64_t I, J;
  const float *q, *k, *v;
  const int32_t *q_pos, *k_pos;
  const int32_t *q_seg = nullptr, *k_seg = nullptr;  // [B, T], [B, S] with segments
  std::vector<int32_t> k_min, k_max;  // [B, J] position range of each key block
  std::vector<int32_t> k_seg_min, k_seg_max;  // [B, J] segment range (with segments)
};

// Per-key-block ranges [B, J] of x [B, S].
void BlockRanges(const Problem& p, const int32_t* x, std::vector<int32_t>& lo,
                 std::vector<int32_t>& hi) {
  lo.assign(p.B * p.J, std::numeric_limits<int32_t>::max());
  hi.assign(p.B * p.J, std::numeric_limits<int32_t>::min());
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t s = 0; s < p.S; ++s) {
      const int64_t bj = b * p.J + s / p.C;
      lo[bj] = std::min(lo[bj], x[b * p.S + s]);
      hi[bj] = std::max(hi[bj], x[b * p.S + s]);
    }
  }
}

ffi::Error MakeProblem(Problem& p, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_pos,
                       ffi::Buffer<ffi::S32> k_pos, int32_t window, float scale, int64_t block_q,
                       int64_t block_k, const ffi::Buffer<ffi::S32>* q_seg = nullptr,
                       const ffi::Buffer<ffi::S32>* k_seg = nullptr) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() < 4 || kd.size() != qd.size()) {
    return ffi::Error::InvalidArgument("flash attention: q and k must be [..., T, N, H] and "
                                       "[..., S, K, H]");
  }
  const size_t r = qd.size();
  p.T = qd[r - 3], p.N = qd[r - 2], p.H = qd[r - 1];
  p.S = kd[r - 3], p.K = kd[r - 2];
  p.B = 1;
  for (size_t i = 0; i + 3 < r; ++i) p.B *= qd[i];
  if (kd[r - 1] != p.H || p.K <= 0 || p.N % p.K != 0 || block_q <= 0 || block_k <= 0 ||
      int64_t(q_pos.element_count()) != p.B * p.T ||
      int64_t(k_pos.element_count()) != p.B * p.S ||
      int64_t(v.element_count()) != p.B * p.S * p.K * p.H ||
      (q_seg != nullptr && int64_t(q_seg->element_count()) != p.B * p.T) ||
      (k_seg != nullptr && int64_t(k_seg->element_count()) != p.B * p.S)) {
    return ffi::Error::InvalidArgument("flash attention: inconsistent shapes");
  }
  p.G = p.N / p.K;
  p.window = window;
  p.scale = scale;
  p.Q = std::max<int64_t>(1, std::min(block_q, p.T));
  p.C = std::max<int64_t>(1, std::min(block_k, p.S));
  p.Cp = (p.C + kLanes - 1) / kLanes * kLanes;
  p.Hp = (p.H + kLanes - 1) / kLanes * kLanes;
  p.I = (p.T + p.Q - 1) / p.Q;
  p.J = (p.S + p.C - 1) / p.C;
  p.q = q.typed_data(), p.k = k.typed_data(), p.v = v.typed_data();
  p.q_pos = q_pos.typed_data(), p.k_pos = k_pos.typed_data();
  BlockRanges(p, p.k_pos, p.k_min, p.k_max);
  if (q_seg != nullptr && k_seg != nullptr) {
    p.q_seg = q_seg->typed_data(), p.k_seg = k_seg->typed_data();
    BlockRanges(p, p.k_seg, p.k_seg_min, p.k_seg_max);
  }
  return ffi::Error::Success();
}

float* Scratch(std::vector<float>& buf, int64_t n) {
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

enum class Visibility { kNone, kPartial, kFull };

// A query block of one (b, kv head): rows r = g * rows + t.
struct QueryBlock {
  int64_t b, kh, t0, rows, M;
  int32_t q_min, q_max;
  int32_t seg_min = 0, seg_max = 0;  // with segments
};

template <bool kSeg>
QueryBlock MakeQueryBlock(const Problem& p, int64_t b, int64_t kh, int64_t i) {
  QueryBlock qb{b, kh, i * p.Q, std::min(p.Q, p.T - i * p.Q), 0, 0, 0};
  qb.M = p.G * qb.rows;
  const int32_t* pos = p.q_pos + b * p.T + qb.t0;
  qb.q_min = *std::min_element(pos, pos + qb.rows);
  qb.q_max = *std::max_element(pos, pos + qb.rows);
  if constexpr (kSeg) {
    const int32_t* seg = p.q_seg + b * p.T + qb.t0;
    qb.seg_min = *std::min_element(seg, seg + qb.rows);
    qb.seg_max = *std::max_element(seg, seg + qb.rows);
  }
  return qb;
}

// Whether some / every query of the block sees some / every key of key block j: by position
// ranges, and with segments by segment ranges (none when they miss each other; every key only
// when query and key block lie in one and the same segment).
template <bool kSeg>
inline Visibility BlockVisibility(const Problem& p, const QueryBlock& qb, int64_t j) {
  const int64_t bj = qb.b * p.J + j;
  const int64_t k_min = p.k_min[bj], k_max = p.k_max[bj], window = p.window;
  if (k_min > qb.q_max || qb.q_min - k_max >= window) return Visibility::kNone;
  if constexpr (kSeg) {
    const int32_t s_min = p.k_seg_min[bj], s_max = p.k_seg_max[bj];
    if (s_min > qb.seg_max || qb.seg_min > s_max) return Visibility::kNone;
    if (s_min != s_max || qb.seg_min != qb.seg_max || s_min != qb.seg_min) {
      return Visibility::kPartial;
    }
  }
  if (k_max <= qb.q_min && qb.q_max - k_min < window) return Visibility::kFull;
  return Visibility::kPartial;
}

// Copies rows of x [B, T, N, H] for the block's G heads into dst [M, Hp] (zero-padded), times
// mul. With Hp <= 64 this is also the packed layout of a B operand.
void GatherRows(const Problem& p, const QueryBlock& qb, const float* x, float mul, float* dst) {
  for (int64_t g = 0; g < p.G; ++g) {
    for (int64_t t = 0; t < qb.rows; ++t) {
      const float* src = x + ((qb.b * p.T + qb.t0 + t) * p.N + qb.kh * p.G + g) * p.H;
      float* out = dst + (g * qb.rows + t) * p.Hp;
      for (int64_t h = 0; h < p.H; ++h) out[h] = src[h] * mul;
      for (int64_t h = p.H; h < p.Hp; ++h) out[h] = 0.f;
    }
  }
}

// A [M, Hp] row-major block as a packed B operand (a copy only when Hp > 64).
const float* AsPacked(const Problem& p, int64_t M, const float* x, std::vector<float>& buf) {
  if (p.Hp <= kStrip) return x;
  float* out = Scratch(buf, M * p.Hp);
  PackRows(x, p.Hp, M, p.Hp, p.Hp, out);
  return out;
}

// Copies x[0, cols) into a buffer of Cp entries (0 beyond cols): on the stack up to 1024.
struct KeyRow {
  alignas(64) int32_t stack[1024 + kLanes];
  std::vector<int32_t> heap;
  int32_t* data;
  KeyRow(const Problem& p, const int32_t* x, int64_t cols) : data(stack) {
    if (p.Cp > 1024) {
      heap.resize(p.Cp);
      data = heap.data();
    }
    for (int64_t c = 0; c < p.Cp; ++c) data[c] = c < cols ? x[c] : 0;
  }
};

// Sets invisible entries of the scores s [M, Cp] (columns >= cols included) to -inf.
template <bool kSeg>
void MaskScores(const Problem& p, const QueryBlock& qb, int64_t s0, int64_t cols, float* s) {
  const KeyRow kp(p, p.k_pos + qb.b * p.S + s0, cols);
  const int32_t* q_pos = p.q_pos + qb.b * p.T + qb.t0;
  const Vec neg_inf = Splat(-kInf);
  IVec iota;
  for (int i = 0; i < kLanes; ++i) iota[i] = i;
  if constexpr (kSeg) {
    const KeyRow ks(p, p.k_seg + qb.b * p.S + s0, cols);
    const int32_t* q_seg = p.q_seg + qb.b * p.T + qb.t0;
    for (int64_t r = 0; r < qb.M; ++r) {
      const IVec qp = SplatI(q_pos[r % qb.rows]), qs = SplatI(q_seg[r % qb.rows]);
      float* row = s + r * p.Cp;
      for (int64_t c = 0; c < p.Cp; c += kLanes) {
        const IVec lane = SplatI(int32_t(c)) + iota;
        IVec d = qp - LoadI(kp.data + c);
        IVec visible = (d >= 0) & (d < SplatI(p.window)) & (lane < SplatI(int32_t(cols))) &
                       (qs == LoadI(ks.data + c));
        Store(row + c, visible ? Load(row + c) : neg_inf);
      }
    }
    return;
  }
  for (int64_t r = 0; r < qb.M; ++r) {
    const IVec qp = SplatI(q_pos[r % qb.rows]);
    float* row = s + r * p.Cp;
    for (int64_t c = 0; c < p.Cp; c += kLanes) {
      const IVec lane = SplatI(int32_t(c)) + iota;
      IVec d = qp - LoadI(kp.data + c);
      IVec visible = (d >= 0) & (d < SplatI(p.window)) & (lane < SplatI(int32_t(cols)));
      Store(row + c, visible ? Load(row + c) : neg_inf);
    }
  }
}

// Sets columns >= cols of s [M, Cp] to -inf.
void MaskTail(const Problem& p, const QueryBlock& qb, int64_t cols, float* s) {
  for (int64_t r = 0; r < qb.M; ++r) std::fill(s + r * p.Cp + cols, s + (r + 1) * p.Cp, -kInf);
}

// ------------------------------------------------------------------------------ forward
// Key and value blocks packed once per call for every (b, kv head, key block): K^T as [Hp, Cp]
// and V as [cols, Hp] (zero-padded), in MatMul's B layout.
struct PackedKV {
  std::vector<float> kt, v;
  int64_t block;  // floats per block (Hp * Cp)
  const float* Kt(const Problem& p, int64_t b, int64_t kh, int64_t j) const {
    return kt.data() + ((b * p.K + kh) * p.J + j) * block;
  }
  const float* V(const Problem& p, int64_t b, int64_t kh, int64_t j) const {
    return v.data() + ((b * p.K + kh) * p.J + j) * block;
  }
};

void PackKeyBlock(const Problem& p, int64_t task, PackedKV& kv) {
  const int64_t j = task % p.J, bk = task / p.J, b = bk / p.K, kh = bk % p.K;
  const int64_t s0 = j * p.C, cols = std::min(p.C, p.S - s0), ld_kv = p.K * p.H;
  const int64_t off = (b * p.S + s0) * ld_kv + kh * p.H;
  PackTransposed(p.k + off, ld_kv, cols, p.H, p.Hp, p.Cp, kv.kt.data() + task * kv.block);
  PackRows(p.v + off, ld_kv, cols, p.H, p.Hp, kv.v.data() + task * kv.block);
}

template <bool kSeg>
void ForwardTask(const Problem& p, const PackedKV& kv, int64_t task, float* out, float* lse) {
  // Heaviest query blocks (last ones, for causal positions) first.
  const int64_t i = p.I - 1 - task / (p.B * p.K);
  const int64_t b = (task % (p.B * p.K)) / p.K, kh = task % p.K;
  const QueryBlock qb = MakeQueryBlock<kSeg>(p, b, kh, i);
  const int64_t M = qb.M, Hp = p.Hp;
  thread_local std::vector<float> q_buf, s_buf, acc_buf, m_buf, l_buf;
  float* qs = Scratch(q_buf, M * Hp);
  float* s = Scratch(s_buf, M * p.Cp);
  float* acc = Scratch(acc_buf, M * Hp);
  float* m = Scratch(m_buf, M);
  float* l = Scratch(l_buf, M);
  GatherRows(p, qb, p.q, p.scale * kLog2e, qs);
  std::fill(acc, acc + M * Hp, 0.f);
  std::fill(m, m + M, -kInf);
  std::fill(l, l + M, 0.f);
  for (int64_t j = 0; j < p.J; ++j) {
    const Visibility vis = BlockVisibility<kSeg>(p, qb, j);
    if (vis == Visibility::kNone) continue;
    const int64_t s0 = j * p.C, cols = std::min(p.C, p.S - s0);
    MatMul(M, p.Cp, Hp, qs, Hp, 1, kv.Kt(p, b, kh, j), s, p.Cp, false);
    if (vis == Visibility::kPartial) {
      MaskScores<kSeg>(p, qb, s0, cols, s);
    } else if (cols < p.Cp) {
      MaskTail(p, qb, cols, s);
    }
    for (int64_t r = 0; r < M; ++r) {
      float* row = s + r * p.Cp;
      Vec vmax = Splat(-kInf);
      for (int64_t c = 0; c < p.Cp; c += kLanes) vmax = Max(vmax, Load(row + c));
      const float row_max = HMax(vmax);
      if (row_max == -kInf) {  // nothing visible in this block: p = 0, state unchanged
        std::fill(row, row + p.Cp, 0.f);
        continue;
      }
      const float m_new = std::max(m[r], row_max);
      const Vec mv = Splat(m_new);
      Vec vsum = Splat(0.f);
      for (int64_t c = 0; c < p.Cp; c += kLanes) {
        const Vec e = Exp2(Load(row + c) - mv);
        vsum += e;
        Store(row + c, e);
      }
      const float corr = Exp2(Splat(m[r] - m_new))[0];
      m[r] = m_new;
      l[r] = l[r] * corr + HSum(vsum);
      if (corr != 1.f) {
        float* a = acc + r * Hp;
        for (int64_t h = 0; h < Hp; ++h) a[h] *= corr;
      }
    }
    MatMul(M, Hp, cols, s, p.Cp, 1, kv.V(p, b, kh, j), acc, Hp, true);
  }
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t n = kh * p.G + g;
    for (int64_t t = 0; t < qb.rows; ++t) {
      const int64_t r = g * qb.rows + t;
      const bool seen = l[r] > 0.f;
      const float inv = seen ? 1.f / l[r] : 0.f;
      float* o = out + ((b * p.T + qb.t0 + t) * p.N + n) * p.H;
      for (int64_t h = 0; h < p.H; ++h) o[h] = acc[r * Hp + h] * inv;
      lse[(b * p.N + n) * p.T + qb.t0 + t] = seen ? kLn2 * (m[r] + std::log2(l[r])) : kInf;
    }
  }
}

template <bool kSeg>
void Forward(const Problem& p, ffi::ResultBuffer<ffi::F32>& out, ffi::ResultBuffer<ffi::F32>& lse) {
  float* o = out->typed_data();
  float* l = lse->typed_data();
  // Kept by the calling thread (no page faults on every call); workers reach it through `kv`, as
  // a thread_local named inside a lambda would be the worker's own.
  thread_local PackedKV caller_kv;
  PackedKV& kv = caller_kv;
  kv.block = p.Hp * p.Cp;
  const int64_t blocks = p.B * p.K * p.J;
  Scratch(kv.kt, blocks * kv.block);
  Scratch(kv.v, blocks * kv.block);
  Pool& pool = Pool::Get();
  pool.Run(blocks, [&](int64_t task) { PackKeyBlock(p, task, kv); });
  pool.Run(p.B * p.K * p.I, [&](int64_t task) { ForwardTask<kSeg>(p, kv, task, o, l); });
}

ffi::Error FlashForwardImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_pos,
                            ffi::Buffer<ffi::S32> k_pos, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse, int32_t window, float scale,
                            int64_t block_q, int64_t block_k) {
  Problem p;
  ffi::Error err = MakeProblem(p, q, k, v, q_pos, k_pos, window, scale, block_q, block_k);
  if (err.failure()) return err;
  Forward<false>(p, out, lse);
  return ffi::Error::Success();
}

ffi::Error FlashForwardSegmentsImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_pos,
                                    ffi::Buffer<ffi::S32> k_pos, ffi::Buffer<ffi::S32> q_seg,
                                    ffi::Buffer<ffi::S32> k_seg, ffi::ResultBuffer<ffi::F32> out,
                                    ffi::ResultBuffer<ffi::F32> lse, int32_t window, float scale,
                                    int64_t block_q, int64_t block_k) {
  Problem p;
  ffi::Error err =
      MakeProblem(p, q, k, v, q_pos, k_pos, window, scale, block_q, block_k, &q_seg, &k_seg);
  if (err.failure()) return err;
  Forward<true>(p, out, lse);
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------ backward
// Flash-attention-2 backward (Dao, 2023): per key block, recompute p = exp(s - lse) for every
// visible query block; dv += p^T do, ds = p * (do v^T - delta), dk += ds^T q, dq += ds k
// (dq rows are shared between key blocks: added under the query block's lock).
struct Grads {
  const float *o, *dout, *lse;
  float *dq, *dk, *dv;
  std::vector<std::mutex>* locks;  // [B, K, I]
};

// Per query block (b, kv head, i), gathered once per call: q * scale * log2(e) and dout as
// [G * Q, Hp] rows, lse in base 2 and delta = rowsum(dout * out) as [G * Q].
struct QueryRows {
  std::vector<float> q, dout, lse2, delta;
  int64_t rows;  // G * Q
  int64_t Offset(const Problem& p, int64_t b, int64_t kh, int64_t i) const {
    return ((b * p.K + kh) * p.I + i) * rows;
  }
};

void GatherQueryBlock(const Problem& p, const Grads& gr, int64_t task, QueryRows& qr) {
  const int64_t i = task % p.I, bk = task / p.I, b = bk / p.K, kh = bk % p.K;
  const QueryBlock qb = MakeQueryBlock<false>(p, b, kh, i);
  const int64_t off = qr.Offset(p, b, kh, i);
  float* dos = qr.dout.data() + off * p.Hp;
  GatherRows(p, qb, p.q, p.scale * kLog2e, qr.q.data() + off * p.Hp);
  GatherRows(p, qb, gr.dout, 1.f, dos);
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t n = kh * p.G + g;
    for (int64_t t = 0; t < qb.rows; ++t) {
      const int64_t r = g * qb.rows + t;
      qr.lse2[off + r] = gr.lse[(b * p.N + n) * p.T + qb.t0 + t] * kLog2e;
      const float* o = gr.o + ((b * p.T + qb.t0 + t) * p.N + n) * p.H;
      float d = 0.f;
      for (int64_t h = 0; h < p.H; ++h) d += o[h] * dos[r * p.Hp + h];
      qr.delta[off + r] = d;
    }
  }
}

template <bool kSeg>
void BackwardTask(const Problem& p, const Grads& gr, const QueryRows& qr, int64_t task) {
  const int64_t j = task / (p.B * p.K);  // first key blocks see the most queries: first
  const int64_t b = (task % (p.B * p.K)) / p.K, kh = task % p.K;
  const int64_t H = p.H, Hp = p.Hp, ld_kv = p.K * p.H, s0 = j * p.C;
  const int64_t cols = std::min(p.C, p.S - s0), Mmax = p.G * p.Q;
  const float* kj = p.k + (b * p.S + s0) * ld_kv + kh * H;
  const float* vj = p.v + (b * p.S + s0) * ld_kv + kh * H;
  thread_local std::vector<float> kt_buf, vt_buf, kr_buf, qp_buf, dop_buf, s_buf, dp_buf, dq_buf,
      dk_buf, dv_buf;
  float* kt = Scratch(kt_buf, Hp * p.Cp);
  float* vt = Scratch(vt_buf, Hp * p.Cp);
  float* kr = Scratch(kr_buf, p.Cp * Hp);
  float* s = Scratch(s_buf, Mmax * p.Cp);
  float* dp = Scratch(dp_buf, Mmax * p.Cp);
  float* dq = Scratch(dq_buf, Mmax * Hp);
  float* dk = Scratch(dk_buf, p.Cp * Hp);
  float* dv = Scratch(dv_buf, p.Cp * Hp);
  PackTransposed(kj, ld_kv, cols, H, Hp, p.Cp, kt);
  PackTransposed(vj, ld_kv, cols, H, Hp, p.Cp, vt);
  PackRows(kj, ld_kv, cols, H, Hp, kr);
  std::fill(dk, dk + cols * Hp, 0.f);
  std::fill(dv, dv + cols * Hp, 0.f);
  bool any = false;
  for (int64_t i = 0; i < p.I; ++i) {
    const QueryBlock qb = MakeQueryBlock<kSeg>(p, b, kh, i);
    const Visibility vis = BlockVisibility<kSeg>(p, qb, j);
    if (vis == Visibility::kNone) continue;
    any = true;
    const int64_t M = qb.M, off = qr.Offset(p, b, kh, i);
    const float* qs = qr.q.data() + off * Hp;
    const float* dos = qr.dout.data() + off * Hp;
    const float* lse2 = qr.lse2.data() + off;
    const float* delta = qr.delta.data() + off;
    MatMul(M, p.Cp, Hp, qs, Hp, 1, kt, s, p.Cp, false);
    if (vis == Visibility::kPartial) {
      MaskScores<kSeg>(p, qb, s0, cols, s);
    } else if (cols < p.Cp) {
      MaskTail(p, qb, cols, s);
    }
    for (int64_t r = 0; r < M; ++r) {
      float* row = s + r * p.Cp;
      const Vec lv = Splat(lse2[r]);
      for (int64_t c = 0; c < p.Cp; c += kLanes) Store(row + c, Exp2(Load(row + c) - lv));
    }
    MatMul(cols, Hp, M, s, 1, p.Cp, AsPacked(p, M, dos, dop_buf), dv, Hp, true);
    MatMul(M, p.Cp, Hp, dos, Hp, 1, vt, dp, p.Cp, false);
    for (int64_t r = 0; r < M; ++r) {
      float* prow = s + r * p.Cp;
      const float* dprow = dp + r * p.Cp;
      const Vec dv_ = Splat(delta[r]);
      for (int64_t c = 0; c < p.Cp; c += kLanes) {
        Store(prow + c, Load(prow + c) * (Load(dprow + c) - dv_));  // ds, in place of p
      }
    }
    MatMul(cols, Hp, M, s, 1, p.Cp, AsPacked(p, M, qs, qp_buf), dk, Hp, true);
    MatMul(M, Hp, cols, s, p.Cp, 1, kr, dq, Hp, false);
    std::lock_guard<std::mutex> lock((*gr.locks)[(b * p.K + kh) * p.I + i]);
    for (int64_t g = 0; g < p.G; ++g) {
      for (int64_t t = 0; t < qb.rows; ++t) {
        float* dst = gr.dq + ((b * p.T + qb.t0 + t) * p.N + kh * p.G + g) * H;
        const float* src = dq + (g * qb.rows + t) * Hp;
        for (int64_t h = 0; h < H; ++h) dst[h] += p.scale * src[h];
      }
    }
  }
  // dk was accumulated against q * scale * log2(e): one ln(2) brings it to scale * q.
  for (int64_t c = 0; c < cols; ++c) {
    float* dk_out = gr.dk + (b * p.S + s0 + c) * ld_kv + kh * H;
    float* dv_out = gr.dv + (b * p.S + s0 + c) * ld_kv + kh * H;
    for (int64_t h = 0; h < H; ++h) {
      dk_out[h] = any ? kLn2 * dk[c * Hp + h] : 0.f;
      dv_out[h] = any ? dv[c * Hp + h] : 0.f;
    }
  }
}

template <bool kSeg>
void Backward(const Problem& p, ffi::Buffer<ffi::F32>& out, ffi::Buffer<ffi::F32>& lse,
              ffi::Buffer<ffi::F32>& dout, ffi::ResultBuffer<ffi::F32>& dq,
              ffi::ResultBuffer<ffi::F32>& dk, ffi::ResultBuffer<ffi::F32>& dv) {
  std::vector<std::mutex> locks(p.B * p.K * p.I);
  Grads gr{out.typed_data(), dout.typed_data(), lse.typed_data(), dq->typed_data(),
           dk->typed_data(), dv->typed_data(), &locks};
  Pool& pool = Pool::Get();
  const int64_t rows = p.B * p.T, chunk = (rows + pool.size() - 1) / pool.size();
  pool.Run(pool.size(), [&](int64_t w) {
    const int64_t lo = std::min(rows, w * chunk), hi = std::min(rows, lo + chunk);
    std::fill(gr.dq + lo * p.N * p.H, gr.dq + hi * p.N * p.H, 0.f);
  });
  thread_local QueryRows caller_qr;  // kept by the calling thread, as in the forward
  QueryRows& qr = caller_qr;
  qr.rows = p.G * p.Q;
  const int64_t blocks = p.B * p.K * p.I;
  Scratch(qr.q, blocks * qr.rows * p.Hp);
  Scratch(qr.dout, blocks * qr.rows * p.Hp);
  Scratch(qr.lse2, blocks * qr.rows);
  Scratch(qr.delta, blocks * qr.rows);
  pool.Run(blocks, [&](int64_t task) { GatherQueryBlock(p, gr, task, qr); });
  pool.Run(p.B * p.K * p.J, [&](int64_t task) { BackwardTask<kSeg>(p, gr, qr, task); });
}

ffi::Error FlashBackwardImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_pos,
                             ffi::Buffer<ffi::S32> k_pos, ffi::Buffer<ffi::F32> out,
                             ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv, int32_t window, float scale,
                             int64_t block_q, int64_t block_k) {
  Problem p;
  ffi::Error err = MakeProblem(p, q, k, v, q_pos, k_pos, window, scale, block_q, block_k);
  if (err.failure()) return err;
  Backward<false>(p, out, lse, dout, dq, dk, dv);
  return ffi::Error::Success();
}

ffi::Error FlashBackwardSegmentsImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_pos,
                                     ffi::Buffer<ffi::S32> k_pos, ffi::Buffer<ffi::S32> q_seg,
                                     ffi::Buffer<ffi::S32> k_seg, ffi::Buffer<ffi::F32> out,
                                     ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                                     ffi::ResultBuffer<ffi::F32> dq,
                                     ffi::ResultBuffer<ffi::F32> dk,
                                     ffi::ResultBuffer<ffi::F32> dv, int32_t window, float scale,
                                     int64_t block_q, int64_t block_k) {
  Problem p;
  ffi::Error err =
      MakeProblem(p, q, k, v, q_pos, k_pos, window, scale, block_q, block_k, &q_seg, &k_seg);
  if (err.failure()) return err;
  Backward<true>(p, out, lse, dout, dq, dk, dv);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongropeFlashForward, FlashForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_pos
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<int32_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongropeFlashForwardSegments, FlashForwardSegmentsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_seg
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<int32_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongropeFlashBackward, FlashBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_pos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<int32_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongropeFlashBackwardSegments, FlashBackwardSegmentsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_seg
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<int32_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block_q")
                                  .Attr<int64_t>("block_k"));

// Threads the kernels run on (the CPUs this process may use).
extern "C" int LongropeFlashNumThreads() { return Pool::Get().size(); }
