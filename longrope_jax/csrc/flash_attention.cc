// Fused causal grouped-query flash attention for CPU, called from JAX as XLA FFI custom calls.
//
// Semantics of longrope_jax/attention.py:dense_attention: key s is visible to query t iff
// k_pos[s] <= q_pos[t] (and q_pos[t] - k_pos[s] < window); rows with no visible key give zeros.
// Shapes (leading dims before the last three are flattened into B, so vmap folds into the
// batch): q, out, dq [B, T, N, H]; k, v, dk, dv [B, S, K, H]; q_pos [B, T]; k_pos [B, S];
// lse [B, N, T] (natural log, +inf where no key is visible); N = K * G.
//
// One task is (b, kv head, query block) in the forward and (b, kv head, key block) in the
// backward; the G query heads of a kv head are stacked as rows (M = G * Q) so one sgemm serves
// the whole group. Key blocks outside a query block's position range are skipped, and only
// blocks straddling the causal edge (or the window edge) are masked element by element.
// Matmuls go to a BLAS sgemm found at load time (OpenBLAS, single-threaded per task); the tasks
// run on a pool with one thread per CPU the process may use. Softmax is online, in base 2.

#include <dlfcn.h>
#include <sched.h>

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
constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(64)));
typedef int32_t IVec __attribute__((vector_size(64)));
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
inline IVec LoadI(const int32_t* p) {
  IVec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Vec Splat(float x) { return Vec{} + x; }
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

// 2^x to ~1 ulp: round x to the nearest integer n, 2^(x - n) by a degree-6 Taylor polynomial
// on [-0.5, 0.5], times 2^n built in the exponent bits. x <= -127 (and -inf) gives 0.
inline Vec Exp2(Vec x) {
  x = Max(x, Splat(-127.f));
  x = x < Splat(127.f) ? x : Splat(127.f);
  const Vec magic = Splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  Vec n = (x + magic) - magic;
  Vec f = x - n;
  Vec p = Splat(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// ------------------------------------------------------------------------------ BLAS
// Row-major C = alpha * op(A) @ op(B) + beta * C through cblas_sgemm (ILP64 or LP64 symbol),
// or a plain loop when no BLAS was loaded.
typedef void (*Sgemm64)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                        const float*, int64_t, float, float*, int64_t);
typedef void (*Sgemm32)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                        float, float*, int);
typedef int (*SetThreadsLocal)(int);

struct Blas {
  Sgemm64 sgemm64 = nullptr;
  Sgemm32 sgemm32 = nullptr;
  SetThreadsLocal set_threads_local = nullptr;
};
Blas g_blas;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (g_blas.sgemm64) {
    g_blas.sgemm64(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, alpha, a,
                   lda, b, ldb, beta, c, ldc);
    return;
  }
  if (g_blas.sgemm32) {
    g_blas.sgemm32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(m), int(n),
                   int(k), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
    return;
  }
  std::vector<float> row(n);
  for (int64_t i = 0; i < m; ++i) {
    std::fill(row.begin(), row.end(), 0.f);
    for (int64_t p = 0; p < k; ++p) {
      const float aip = ta ? a[p * lda + i] : a[i * lda + p];
      if (tb) {
        for (int64_t j = 0; j < n; ++j) row[j] += aip * b[j * ldb + p];
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] += aip * b[p * ldb + j];
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      c[i * ldc + j] = alpha * row[j] + (beta == 0.f ? 0.f : beta * c[i * ldc + j]);
    }
  }
}

// ------------------------------------------------------------------------------ thread pool
// Workers sleep on a condition variable (no spinning: the cores are XLA's between calls). The
// caller only waits, so BLAS runs only on pool threads, each set to one BLAS thread.
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
    if (g_blas.set_threads_local) g_blas.set_threads_local(1);
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
  int64_t Q, C, Cp;  // query block, key block, key block padded to whole vectors
  int64_t I, J;
  const float *q, *k, *v;
  const int32_t *q_pos, *k_pos;
  std::vector<int32_t> k_min, k_max;  // [B, J] position range of each key block
};

ffi::Error MakeProblem(Problem& p, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_pos,
                       ffi::Buffer<ffi::S32> k_pos, int32_t window, float scale, int64_t block_q,
                       int64_t block_k) {
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
      int64_t(v.element_count()) != p.B * p.S * p.K * p.H) {
    return ffi::Error::InvalidArgument("flash attention: inconsistent shapes");
  }
  p.G = p.N / p.K;
  p.window = window;
  p.scale = scale;
  p.Q = std::max<int64_t>(1, std::min(block_q, p.T));
  p.C = std::max<int64_t>(1, std::min(block_k, p.S));
  p.Cp = (p.C + kLanes - 1) / kLanes * kLanes;
  p.I = (p.T + p.Q - 1) / p.Q;
  p.J = (p.S + p.C - 1) / p.C;
  p.q = q.typed_data(), p.k = k.typed_data(), p.v = v.typed_data();
  p.q_pos = q_pos.typed_data(), p.k_pos = k_pos.typed_data();
  p.k_min.assign(p.B * p.J, std::numeric_limits<int32_t>::max());
  p.k_max.assign(p.B * p.J, std::numeric_limits<int32_t>::min());
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t s = 0; s < p.S; ++s) {
      const int64_t bj = b * p.J + s / p.C;
      const int32_t x = p.k_pos[b * p.S + s];
      p.k_min[bj] = std::min(p.k_min[bj], x);
      p.k_max[bj] = std::max(p.k_max[bj], x);
    }
  }
  return ffi::Error::Success();
}

enum class Visibility { kNone, kPartial, kFull };

// Whether some / every query in [q_min, q_max] sees some / every key in [k_min, k_max].
inline Visibility BlockVisibility(int64_t q_min, int64_t q_max, int64_t k_min, int64_t k_max,
                                  int64_t window) {
  if (k_min > q_max || q_min - k_max >= window) return Visibility::kNone;
  if (k_max <= q_min && q_max - k_min < window) return Visibility::kFull;
  return Visibility::kPartial;
}

// A query block of one (b, kv head): rows r = g * rows + t.
struct QueryBlock {
  int64_t b, kh, t0, rows, M;
  int32_t q_min, q_max;
};

QueryBlock MakeQueryBlock(const Problem& p, int64_t b, int64_t kh, int64_t i) {
  QueryBlock qb{b, kh, i * p.Q, std::min(p.Q, p.T - i * p.Q), 0, 0, 0};
  qb.M = p.G * qb.rows;
  const int32_t* pos = p.q_pos + b * p.T + qb.t0;
  qb.q_min = *std::min_element(pos, pos + qb.rows);
  qb.q_max = *std::max_element(pos, pos + qb.rows);
  return qb;
}

// Copies rows of x [B, T, N, H] for the block's G heads into dst [M, H], times mul.
void GatherRows(const Problem& p, const QueryBlock& qb, const float* x, float mul, float* dst) {
  for (int64_t g = 0; g < p.G; ++g) {
    for (int64_t t = 0; t < qb.rows; ++t) {
      const float* src = x + ((qb.b * p.T + qb.t0 + t) * p.N + qb.kh * p.G + g) * p.H;
      float* out = dst + (g * qb.rows + t) * p.H;
      for (int64_t h = 0; h < p.H; ++h) out[h] = src[h] * mul;
    }
  }
}

// Sets invisible entries of the scores s [M, Cp] (columns >= cols included) to -inf.
void MaskScores(const Problem& p, const QueryBlock& qb, int64_t s0, int64_t cols, float* s) {
  const int32_t* k_pos = p.k_pos + qb.b * p.S + s0;
  alignas(64) int32_t kp[1024 + kLanes];
  std::vector<int32_t> kp_heap;
  int32_t* kpb = kp;
  if (p.Cp > 1024) {
    kp_heap.resize(p.Cp);
    kpb = kp_heap.data();
  }
  for (int64_t c = 0; c < p.Cp; ++c) kpb[c] = c < cols ? k_pos[c] : 0;
  const int32_t* q_pos = p.q_pos + qb.b * p.T + qb.t0;
  const Vec neg_inf = Splat(-kInf);
  for (int64_t r = 0; r < qb.M; ++r) {
    const IVec qp = SplatI(q_pos[r % qb.rows]);
    float* row = s + r * p.Cp;
    for (int64_t c = 0; c < p.Cp; c += kLanes) {
      IVec lane = SplatI(int32_t(c)) + IVec{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
      IVec d = qp - LoadI(kpb + c);
      IVec visible = (d >= 0) & (d < SplatI(p.window)) & (lane < SplatI(int32_t(cols)));
      Store(row + c, visible ? Load(row + c) : neg_inf);
    }
  }
}

// Sets columns >= cols of s [M, Cp] to -inf.
void MaskTail(const Problem& p, const QueryBlock& qb, int64_t cols, float* s) {
  for (int64_t r = 0; r < qb.M; ++r) std::fill(s + r * p.Cp + cols, s + (r + 1) * p.Cp, -kInf);
}

float* Scratch(std::vector<float>& buf, int64_t n) {
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// ------------------------------------------------------------------------------ forward
void ForwardTask(const Problem& p, int64_t task, float* out, float* lse) {
  // Heaviest query blocks (last ones, for causal positions) first.
  const int64_t i = p.I - 1 - task / (p.B * p.K);
  const int64_t b = (task % (p.B * p.K)) / p.K, kh = task % p.K;
  const QueryBlock qb = MakeQueryBlock(p, b, kh, i);
  const int64_t M = qb.M, H = p.H, ld_kv = p.K * p.H;
  thread_local std::vector<float> q_buf, s_buf, acc_buf, m_buf, l_buf;
  float* qs = Scratch(q_buf, M * H);
  float* s = Scratch(s_buf, M * p.Cp);
  float* acc = Scratch(acc_buf, M * H);
  float* m = Scratch(m_buf, M);
  float* l = Scratch(l_buf, M);
  GatherRows(p, qb, p.q, p.scale * kLog2e, qs);
  std::fill(acc, acc + M * H, 0.f);
  std::fill(m, m + M, -kInf);
  std::fill(l, l + M, 0.f);
  for (int64_t j = 0; j < p.J; ++j) {
    const Visibility vis = BlockVisibility(qb.q_min, qb.q_max, p.k_min[b * p.J + j],
                                           p.k_max[b * p.J + j], p.window);
    if (vis == Visibility::kNone) continue;
    const int64_t s0 = j * p.C, cols = std::min(p.C, p.S - s0);
    const float* kj = p.k + (b * p.S + s0) * ld_kv + kh * H;
    const float* vj = p.v + (b * p.S + s0) * ld_kv + kh * H;
    Gemm(false, true, M, cols, H, 1.f, qs, H, kj, ld_kv, 0.f, s, p.Cp);
    if (vis == Visibility::kPartial) {
      MaskScores(p, qb, s0, cols, s);
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
        float* a = acc + r * H;
        for (int64_t h = 0; h < H; ++h) a[h] *= corr;
      }
    }
    Gemm(false, false, M, H, cols, 1.f, s, p.Cp, vj, ld_kv, 1.f, acc, H);
  }
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t n = kh * p.G + g;
    for (int64_t t = 0; t < qb.rows; ++t) {
      const int64_t r = g * qb.rows + t;
      const bool seen = l[r] > 0.f;
      const float inv = seen ? 1.f / l[r] : 0.f;
      float* o = out + ((b * p.T + qb.t0 + t) * p.N + n) * H;
      for (int64_t h = 0; h < H; ++h) o[h] = acc[r * H + h] * inv;
      lse[(b * p.N + n) * p.T + qb.t0 + t] = seen ? kLn2 * (m[r] + std::log2(l[r])) : kInf;
    }
  }
}

ffi::Error FlashForwardImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_pos,
                            ffi::Buffer<ffi::S32> k_pos, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse, int32_t window, float scale,
                            int64_t block_q, int64_t block_k) {
  Problem p;
  ffi::Error err = MakeProblem(p, q, k, v, q_pos, k_pos, window, scale, block_q, block_k);
  if (err.failure()) return err;
  float* o = out->typed_data();
  float* l = lse->typed_data();
  Pool::Get().Run(p.B * p.K * p.I, [&](int64_t task) { ForwardTask(p, task, o, l); });
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

void BackwardTask(const Problem& p, const Grads& gr, int64_t task) {
  const int64_t j = task / (p.B * p.K);  // first key blocks see the most queries: first
  const int64_t b = (task % (p.B * p.K)) / p.K, kh = task % p.K;
  const int64_t H = p.H, ld_kv = p.K * p.H, s0 = j * p.C, cols = std::min(p.C, p.S - s0);
  const float* kj = p.k + (b * p.S + s0) * ld_kv + kh * H;
  const float* vj = p.v + (b * p.S + s0) * ld_kv + kh * H;
  const int64_t Mmax = p.G * p.Q;
  thread_local std::vector<float> q_buf, do_buf, s_buf, dp_buf, dq_buf, dk_buf, dv_buf, lse_buf,
      delta_buf;
  float* qs = Scratch(q_buf, Mmax * H);
  float* dos = Scratch(do_buf, Mmax * H);
  float* s = Scratch(s_buf, Mmax * p.Cp);
  float* dp = Scratch(dp_buf, Mmax * p.Cp);
  float* dq = Scratch(dq_buf, Mmax * H);
  float* dk = Scratch(dk_buf, p.C * H);
  float* dv = Scratch(dv_buf, p.C * H);
  float* lse2 = Scratch(lse_buf, Mmax);
  float* delta = Scratch(delta_buf, Mmax);
  std::fill(dk, dk + cols * H, 0.f);
  std::fill(dv, dv + cols * H, 0.f);
  const float q_mul = p.scale * kLog2e;
  bool any = false;
  for (int64_t i = 0; i < p.I; ++i) {
    const QueryBlock qb = MakeQueryBlock(p, b, kh, i);
    const Visibility vis = BlockVisibility(qb.q_min, qb.q_max, p.k_min[b * p.J + j],
                                           p.k_max[b * p.J + j], p.window);
    if (vis == Visibility::kNone) continue;
    any = true;
    const int64_t M = qb.M;
    GatherRows(p, qb, p.q, q_mul, qs);
    GatherRows(p, qb, gr.dout, 1.f, dos);
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t n = kh * p.G + g;
      for (int64_t t = 0; t < qb.rows; ++t) {
        const int64_t r = g * qb.rows + t, bt = b * p.T + qb.t0 + t;
        lse2[r] = gr.lse[(b * p.N + n) * p.T + qb.t0 + t] * kLog2e;
        const float* o = gr.o + (bt * p.N + n) * H;
        float d = 0.f;
        for (int64_t h = 0; h < H; ++h) d += o[h] * dos[r * H + h];
        delta[r] = d;
      }
    }
    Gemm(false, true, M, cols, H, 1.f, qs, H, kj, ld_kv, 0.f, s, p.Cp);
    if (vis == Visibility::kPartial) {
      MaskScores(p, qb, s0, cols, s);
    } else if (cols < p.Cp) {
      MaskTail(p, qb, cols, s);
    }
    for (int64_t r = 0; r < M; ++r) {
      float* row = s + r * p.Cp;
      const Vec lv = Splat(lse2[r]);
      for (int64_t c = 0; c < p.Cp; c += kLanes) Store(row + c, Exp2(Load(row + c) - lv));
    }
    Gemm(true, false, cols, H, M, 1.f, s, p.Cp, dos, H, 1.f, dv, H);
    Gemm(false, true, M, cols, H, 1.f, dos, H, vj, ld_kv, 0.f, dp, p.Cp);
    for (int64_t r = 0; r < M; ++r) {
      float* prow = s + r * p.Cp;
      const float* dprow = dp + r * p.Cp;
      const Vec dv_ = Splat(delta[r]);
      for (int64_t c = 0; c < p.Cp; c += kLanes) {
        Store(prow + c, Load(prow + c) * (Load(dprow + c) - dv_));  // ds, in place of p
      }
    }
    Gemm(true, false, cols, H, M, 1.f, s, p.Cp, qs, H, 1.f, dk, H);
    Gemm(false, false, M, H, cols, 1.f, s, p.Cp, kj, ld_kv, 0.f, dq, H);
    std::lock_guard<std::mutex> lock((*gr.locks)[(b * p.K + kh) * p.I + i]);
    for (int64_t g = 0; g < p.G; ++g) {
      for (int64_t t = 0; t < qb.rows; ++t) {
        float* dst = gr.dq + ((b * p.T + qb.t0 + t) * p.N + kh * p.G + g) * H;
        const float* src = dq + (g * qb.rows + t) * H;
        for (int64_t h = 0; h < H; ++h) dst[h] += p.scale * src[h];
      }
    }
  }
  // dk was accumulated against q * scale * log2(e): one ln(2) brings it to scale * q.
  for (int64_t c = 0; c < cols; ++c) {
    float* dk_out = gr.dk + (b * p.S + s0 + c) * ld_kv + kh * H;
    float* dv_out = gr.dv + (b * p.S + s0 + c) * ld_kv + kh * H;
    for (int64_t h = 0; h < H; ++h) {
      dk_out[h] = any ? kLn2 * dk[c * H + h] : 0.f;
      dv_out[h] = any ? dv[c * H + h] : 0.f;
    }
  }
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
  std::vector<std::mutex> locks(p.B * p.K * p.I);
  Grads gr{out.typed_data(), dout.typed_data(), lse.typed_data(), dq->typed_data(),
           dk->typed_data(), dv->typed_data(), &locks};
  Pool& pool = Pool::Get();
  const int64_t rows = p.B * p.T, chunk = (rows + pool.size() - 1) / pool.size();
  pool.Run(pool.size(), [&](int64_t w) {
    const int64_t lo = std::min(rows, w * chunk), hi = std::min(rows, lo + chunk);
    std::fill(gr.dq + lo * p.N * p.H, gr.dq + hi * p.N * p.H, 0.f);
  });
  pool.Run(p.B * p.K * p.J, [&](int64_t task) { BackwardTask(p, gr, task); });
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

// Loads sgemm from the BLAS library at `path` (the one numpy already loaded). Returns 2 for an
// ILP64 symbol, 1 for LP64, 0 when none was found (a plain loop is used then). Call before the
// first kernel: pool threads read the result when they start.
extern "C" int LongropeFlashSetBlas(const char* path) {
  void* lib = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : nullptr;
  if (!lib) return 0;
  auto set_local = reinterpret_cast<SetThreadsLocal>(dlsym(lib, "openblas_set_num_threads_local"));
  if (!set_local) return 0;  // without a per-thread setting, parallel calls would oversubscribe
  for (const char* name : {"scipy_cblas_sgemm64_", "cblas_sgemm64_"}) {
    if (void* f = dlsym(lib, name)) {
      g_blas.sgemm64 = reinterpret_cast<Sgemm64>(f);
      g_blas.set_threads_local = set_local;
      return 2;
    }
  }
  for (const char* name : {"scipy_cblas_sgemm", "cblas_sgemm"}) {
    if (void* f = dlsym(lib, name)) {
      g_blas.sgemm32 = reinterpret_cast<Sgemm32>(f);
      g_blas.set_threads_local = set_local;
      return 1;
    }
  }
  return 0;
}

// Threads the kernels run on (the CPUs this process may use).
extern "C" int LongropeFlashNumThreads() { return Pool::Get().size(); }
