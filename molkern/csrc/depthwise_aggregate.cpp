// Fused depthwise convolution sum: out[i, k] = sum_{e: dst[e] = i} K[e, k] (x[src[e], k] * c[e, k]).
//
// One pass over the edges, reading per edge only its kernel matrices K (H x DO x DI), channel weights c (H x P) and
// the source node's features (cache-resident: node tensors are small); the per-edge (E x H x D x P) tensors of the
// unfused form (gathered features, scaled features, messages) are never written. Backward likewise.
//
// Layouts (all contiguous, head-major as molkern.nn.depthwise): x (N, H, DI, P), K (E, H, DO, DI), c (E, H, P) or
// an empty tensor (no channel weights), src / dst (E,) int64, out (N, H, DO, P). Threads (at::parallel_for over
// edge ranges) accumulate node sums into private buffers that are added up at the end.

// The kernel matrices either come stored (K, above) or are built on the fly from the terms of the default kernel
// head (molkern.nn.depthwise_head): K[e, h] = sum_t w[h, t, e] v[e, t] u[e] CG_t, with v[e, t] one column of the
// edge's harmonics (or 1) and u the cutoff envelope; then neither K nor the products w v u nor their gradients are
// written per edge (the `terms_*` functions).

// Also, for constant parameters (molkern.nn.constants): attribute_linear, the self-connection with scalar node
// attributes, and block_linear, a product with a constant matrix stored as its dense blocks (below).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace {

struct Dims {
  int64_t N, E, H, DI, DO, P;
};

// Vectors of T through GCC / Clang vector extensions (the compiler splits them where registers are narrower).
// Loops summing into arrays with `omp simd` were not always vectorised (GCC 12: scalar FMAs only), and
// vectorised ones sum each output along one chain, latency-bound; these keep several sums in registers.
template <typename T, int Bytes>
struct VecOf {
  typedef T V __attribute__((vector_size(Bytes), aligned(sizeof(T)), may_alias));
  static constexpr int64_t L = Bytes / sizeof(T);
};
template <typename T>
using Lanes = VecOf<T, 64>;  // blocks: two of them per row of up to 32 floats
#ifdef __AVX512F__
template <typename T>
using Native = VecOf<T, 64>;  // one register
#else
template <typename T>
using Native = VecOf<T, 32>;
#endif

void check_indices(const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(src.scalar_type() == at::kLong && dst.scalar_type() == at::kLong && src.is_contiguous() &&
                  dst.is_contiguous(), "src and dst must be contiguous int64");
}

Dims check(const at::Tensor& x, const at::Tensor& K, const at::Tensor& c, const at::Tensor& src, const at::Tensor& dst,
           int64_t num_nodes) {
  TORCH_CHECK(x.dim() == 4 && K.dim() == 4, "x must be (N, H, DI, P) and K (E, H, DO, DI)");
  TORCH_CHECK(x.is_contiguous() && K.is_contiguous() && c.is_contiguous(), "x, K and c must be contiguous");
  TORCH_CHECK(x.scalar_type() == K.scalar_type(), "x and K must have one dtype");
  check_indices(src, dst);
  Dims d{num_nodes, K.size(0), K.size(1), K.size(3), K.size(2), x.size(3)};
  TORCH_CHECK(x.size(0) == num_nodes && x.size(1) == d.H && x.size(2) == d.DI, "x and K do not match");
  TORCH_CHECK(src.numel() == d.E && dst.numel() == d.E, "src and dst need one entry per edge");
  TORCH_CHECK(c.numel() == 0 || (c.numel() == d.E * d.H * d.P && c.scalar_type() == x.scalar_type()),
              "c must be (E, H, P) or empty");
  return d;
}

// Per-thread accumulators: thread 0 adds into `out` itself, the others into zeroed buffers reduced by `finish`.
template <typename T>
struct Accumulators {
  T* out;
  int64_t size;
  std::vector<std::vector<T>> extra;
  Accumulators(T* out, int64_t size) : out(out), size(size), extra(std::max(at::get_num_threads() - 1, 0)) {}
  T* get() {
    int tid = at::get_thread_num();
    if (tid == 0) return out;
    auto& buffer = extra[tid - 1];
    if (buffer.empty()) buffer.assign(size, T(0));
    return buffer.data();
  }
  void finish() {
    for (auto& buffer : extra)
      if (!buffer.empty())
        at::parallel_for(0, size, 4096, [&](int64_t b, int64_t e) {
          for (int64_t k = b; k < e; ++k) out[k] += buffer[k];
        });
  }
};

// Where the kernels' per-edge matrices come from. Each thread works on its own copy (scratch) and calls `range`
// with its edge range first, then visits the edges in order, heads innermost: `matrix(e, h)` gives K[e, h] (DO x
// DI, entry (r, i) at [(r DI + i) stride]), `grad_matrix` the buffer its gradient goes into (same layout) and
// `grad_done(e, h)` hands that gradient on.
template <typename T>
struct StoredMatrices {  // K (E, H, DO, DI) given; its gradient written to gK (E, H, DO, DI) or not wanted (null)
  static constexpr int64_t stride = 1;
  const T* K;
  T* gK;
  int64_t H, size;
  bool grad() const { return gK != nullptr; }
  void range(int64_t, int64_t) {}
  const T* matrix(int64_t e, int64_t h) { return K + (e * H + h) * size; }
  T* grad_matrix(int64_t e, int64_t h) { return gK + (e * H + h) * size; }
  void grad_done(int64_t, int64_t) {}
};

// One nonzero Clebsch-Gordan entry: CG_term[pos] = value.
template <typename T>
struct CGEntry {
  int64_t term, pos;
  T value;
};

// K[e, h] = sum_t w[h, t, e] a[e, t] u[e] CG_t, a[e, t] = v[e, rows[t]] (1 where rows[t] < 0): built for tiles of
// `stride` consecutive edges at once, edges in the vector lanes (one vector multiply-add per nonzero CG entry and
// tile), and the gradients taken back to w, v, u likewise.
template <typename T>
struct TermTiles {
  static constexpr int64_t stride = 16;
  const T* w;                          // (H, NT, E) term weights, edges last
  const T* v;                          // (E, V) with row stride v_stride: the vector components the terms read
  const T* u;                          // (E,) envelope
  const int64_t* rows;                 // (NT,) column of v of each term; -1: none (a scalar coefficient's term)
  const std::vector<CGEntry<T>>* by_pos;   // the nonzero CG entries sorted by position (forward)
  const std::vector<CGEntry<T>>* by_term;  // and by term (backward)
  int64_t E, H, size, NT, V, v_stride;
  T* gw;  // gradients (H, NT, E), (E, V), (E,); null where not wanted
  T* gv;
  T* gu;
  // per thread: the tile [start, stop) within this thread's range [., end); S = stride
  int64_t start = 0, stop = 0, end = 0;
  std::vector<T> vu, pt, k, gk, gvu;  // (V + 1, S): v u and u; (NT, S): w a u; (H, size, S) x 2; (V + 1, S)

  bool grad() const { return gw || gv || gu; }
  void range(int64_t, int64_t last) { start = stop = 0, end = last; }
  int64_t row(int64_t t) const { return rows[t] < 0 ? V : rows[t]; }  // of vu

  void build(int64_t first) {
    constexpr int64_t S = stride;
    start = first, stop = std::min(first + S, end);
    const int64_t n = stop - start;
    vu.assign((V + 1) * S, T(0)), k.resize(H * size * S);
    if (stop + S <= end) {  // the next tile's inputs: the hardware prefetchers do not follow NT + 16 streams
      for (int64_t ht = 0; ht < H * NT; ++ht) __builtin_prefetch(w + ht * E + stop + S);
      for (int64_t j = S; j < 2 * S; ++j) {
        const char* row = reinterpret_cast<const char*>(v + (start + j + S) * v_stride);
        __builtin_prefetch(row), __builtin_prefetch(row + V * sizeof(T) - 1);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const T* ve = v + (start + j) * v_stride;
      const T ue = u[start + j];
      for (int64_t r = 0; r < V; ++r) vu[r * S + j] = ve[r] * ue;
      vu[V * S + j] = ue;
    }
    pt.resize(NT * S);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t t = 0; t < NT; ++t) {  // pt[t] = w[h, t] a[t] u
        const T* __restrict__ wt = w + (h * NT + t) * E + start;
        const T* __restrict__ vt = vu.data() + row(t) * S;
        T* __restrict__ out = pt.data() + t * S;
        if (n == S) {
#pragma omp simd
          for (int64_t j = 0; j < S; ++j) out[j] = wt[j] * vt[j];
        } else {
          for (int64_t j = 0; j < S; ++j) out[j] = j < n ? wt[j] * vt[j] : T(0);
        }
      }
      T* __restrict__ kh = k.data() + h * size * S;
      const CGEntry<T>* it = by_pos->data();
      const CGEntry<T>* last = it + by_pos->size();
      const T* __restrict__ p = pt.data();
      for (int64_t q = 0; q < size; ++q) {
        T acc[S] = {};
        for (; it != last && it->pos == q; ++it) {
          const T* __restrict__ pz = p + it->term * S;
          const T c = it->value;
#pragma omp simd
          for (int64_t j = 0; j < S; ++j) acc[j] += c * pz[j];
        }
#pragma omp simd
        for (int64_t j = 0; j < S; ++j) kh[q * S + j] = acc[j];
      }
    }
  }
  const T* matrix(int64_t e, int64_t h) {
    if (e >= stop || e < start) build(e);
    return k.data() + h * size * stride + (e - start);
  }
  T* grad_matrix(int64_t e, int64_t h) {
    gk.resize(H * size * stride);
    return gk.data() + h * size * stride + (e - start);
  }
  void grad_done(int64_t e, int64_t h) {  // after the tile's last matrix: dK -> the terms' gradient -> dw, dv, du
    if (e != stop - 1 || h != H - 1) return;
    constexpr int64_t S = stride;
    const int64_t n = stop - start;
    gvu.assign((V + 1) * S, T(0));  // d / d vu, summed over terms and heads
    for (int64_t h = 0; h < H; ++h) {
      const T* gkh = gk.data() + h * size * S;
      auto it = by_term->begin(), last = by_term->end();
      for (int64_t t = 0; t < NT; ++t) {
        T gt[S] = {};  // d / d(w[h, t] a[t] u)
        for (; it != last && it->term == t; ++it) {
          const T* __restrict__ kz = gkh + it->pos * S;
          const T c = it->value;
#pragma omp simd
          for (int64_t j = 0; j < S; ++j) gt[j] += c * kz[j];
        }
        const T* __restrict__ wt = w + (h * NT + t) * E + start;
        const T* __restrict__ vt = vu.data() + row(t) * S;
        T* __restrict__ gvt = gvu.data() + row(t) * S;
        if (gw) {
          T* __restrict__ out = gw + (h * NT + t) * E + start;
          if (stop + S <= end) __builtin_prefetch(out + 2 * S, 1);  // (see build)
          if (n == S) {
#pragma omp simd
            for (int64_t j = 0; j < S; ++j) out[j] = gt[j] * vt[j];
          } else {
            for (int64_t j = 0; j < n; ++j) out[j] = gt[j] * vt[j];
          }
        }
        if (n == S) {
#pragma omp simd
          for (int64_t j = 0; j < S; ++j) gvt[j] += gt[j] * wt[j];
        } else {
          for (int64_t j = 0; j < n; ++j) gvt[j] += gt[j] * wt[j];
        }
      }
    }
    for (int64_t j = 0; j < n; ++j) {  // vu[r] = v[r] u, vu[V] = u
      const T ue = u[start + j];
      const T* ve = v + (start + j) * v_stride;
      T du = gvu[V * S + j];
      for (int64_t r = 0; r < V; ++r) {
        const T gr = gvu[r * S + j];
        if (gv) gv[(start + j) * V + r] = gr * ue;
        du += gr * ve[r];
      }
      if (gu) gu[start + j] = du;
    }
  }
};

// s[o] = sum_k M[o, k] y[k P + q0 ...] (one vector of channels) for o < NO, with the (DO x DI) matrix entries
// K[(r DI + i) stride]: M = K (NO = DO, NK = DI) or, Transposed, M = K^T (NO = DI, NK = DO). The NO sums stay in
// registers (summed along one chain each, the loops were latency-bound).
template <typename T, int NO, int NK, bool Transposed>
inline void small_matrix_rows(const T* __restrict__ K, int64_t stride, const T* __restrict__ y, int64_t P, int64_t q0,
                              typename Native<T>::V* __restrict__ s) {
  using V = typename Native<T>::V;
  for (int o = 0; o < NO; ++o) s[o] = V{};
  for (int k = 0; k < NK; ++k) {
    const V yk = *reinterpret_cast<const V*>(y + k * P + q0);
    for (int o = 0; o < NO; ++o) s[o] += K[(Transposed ? k * NO + o : o * NK + k) * stride] * yk;
  }
}

// The kernels take DI and DO as template constants for the common sizes (1, 4, 9: lmax 0, 1, 2 features; 0 =
// read from Dims) so that the loops over the matrix entries unroll and the sums stay in registers; the innermost
// loop runs over the P channels of a head (SIMD).
template <typename T, int FDI, int FDO, typename Source>
void forward_kernel(const T* x, const Source& source, const T* c, const int64_t* src, const int64_t* dst, T* out,
                    Dims d) {
  const int64_t DI = FDI ? FDI : d.DI, DO = FDO ? FDO : d.DO, P = d.P;
  constexpr int64_t S = Source::stride;
  const int64_t in_width = d.H * DI * P, out_width = d.H * DO * P;
  Accumulators<T> acc(out, d.N * out_width);
  at::parallel_for(0, d.E, 256, [&](int64_t begin, int64_t end) {
    T* sums = acc.get();
    Source matrices = source;  // this thread's copy (scratch buffers)
    matrices.range(begin, end);
    for (int64_t e = begin; e < end; ++e) {
      for (int64_t h = 0; h < d.H; ++h) {
        const T* __restrict__ xs = x + src[e] * in_width + h * DI * P;
        const T* __restrict__ Ke = matrices.matrix(e, h);
        const T* __restrict__ ce = c ? c + (e * d.H + h) * P : nullptr;
        T* __restrict__ o = sums + dst[e] * out_width + h * DO * P;
        int64_t q0 = 0;
        if constexpr (FDO > 0) {  // o[r, q] += sum_i K[r, i] x[i, q] c[q]: the DO rows' sums in registers
          using V = typename Native<T>::V;
          constexpr int64_t L = Native<T>::L;
          for (; q0 + L <= P; q0 += L) {
            V s[FDO];
            small_matrix_rows<T, FDO, FDI, false>(Ke, S, xs, P, q0, s);
            const V cv = ce ? *reinterpret_cast<const V*>(ce + q0) : V{} + T(1);
            for (int r = 0; r < FDO; ++r) *reinterpret_cast<V*>(o + r * P + q0) += s[r] * cv;
          }
        }
        for (int64_t r = 0; r < DO; ++r) {  // runtime sizes, and the channels left
          const T* __restrict__ Kr = Ke + r * DI * S;
#pragma omp simd
          for (int64_t q = q0; q < P; ++q) {
            T s = 0;
            for (int64_t i = 0; i < DI; ++i) s += Kr[i * S] * xs[i * P + q];
            o[r * P + q] += ce ? s * ce[q] : s;
          }
        }
      }
    }
  });
  acc.finish();
}

// Columns of the transposed, zero-padded features xT (N, H, P, DIP) that the kernel-matrix gradient reads.
constexpr int padded(int n) { return n <= 4 ? 4 : (n <= 8 ? 8 : 16); }

template <typename T, int FDI, int FDO, typename Source>
void backward_kernel(const T* g, const T* x, const T* xT, const Source& source, const T* c, const int64_t* src,
                     const int64_t* dst, T* gx, T* gc, Dims d) {
  const int64_t DI = FDI ? FDI : d.DI, DO = FDO ? FDO : d.DO, P = d.P;
  constexpr int DIP = padded(FDI);
  constexpr int64_t S = Source::stride;
  const int64_t in_width = d.H * DI * P, out_width = d.H * DO * P;
  Accumulators<T> acc(gx, gx ? d.N * in_width : 0);
  at::parallel_for(0, d.E, 256, [&](int64_t begin, int64_t end) {
    T* gx_sums = gx ? acc.get() : nullptr;
    std::vector<T> scratch((2 * DI + DO) * P);  // x c, u (below) and g c of one edge and head
    T* __restrict__ xc = scratch.data();
    T* __restrict__ u = xc + DI * P;
    T* __restrict__ gc_rows = u + DI * P;
    Source matrices = source;  // this thread's copy (scratch buffers)
    matrices.range(begin, end);
    const bool gK = matrices.grad();
    for (int64_t e = begin; e < end; ++e) {
      for (int64_t h = 0; h < d.H; ++h) {
        const int64_t eh = e * d.H + h;
        const T* __restrict__ xs = x + src[e] * in_width + h * DI * P;
        const T* __restrict__ gd = g + dst[e] * out_width + h * DO * P;
        const T* __restrict__ Ke = matrices.matrix(e, h);
        const T* __restrict__ ce = c ? c + eh * P : nullptr;
        T* __restrict__ gKe = gK ? matrices.grad_matrix(e, h) : nullptr;
        bool done = false;
        if constexpr (FDO > 0) {
          if (gK && xT) {  // gK[r, :] = sum_q (g[r, q] c[q]) xT[q, :]: DO vector accumulators over the padded i
            const T* __restrict__ xt = xT + (src[e] * d.H + h) * P * DIP;
            const T* __restrict__ gcs = gd;  // g c, formed first by rows (the products below then read memory)
            if (ce) {
              for (int r = 0; r < FDO; ++r) {
#pragma omp simd
                for (int64_t q = 0; q < P; ++q) gc_rows[r * P + q] = gd[r * P + q] * ce[q];
              }
              gcs = gc_rows;
            }
            T a[FDO][DIP] = {};
            for (int64_t q = 0; q < P; ++q) {
              for (int r = 0; r < FDO; ++r) {
                const T grq = gcs[r * P + q];
#pragma omp simd
                for (int i = 0; i < DIP; ++i) a[r][i] += grq * xt[q * DIP + i];
              }
            }
            for (int r = 0; r < FDO; ++r)
              for (int i = 0; i < FDI; ++i) gKe[(r * FDI + i) * S] = a[r][i];
            done = true;
          }
        }
        if (gK && !done) {  // runtime sizes: gK[r, i] = sum_q g[r, q] x[i, q] c[q], four rows r at a time
          const T* __restrict__ xcs = xs;
          if (ce) {
            for (int64_t i = 0; i < DI; ++i) {
#pragma omp simd
              for (int64_t q = 0; q < P; ++q) xc[i * P + q] = xs[i * P + q] * ce[q];
            }
            xcs = xc;
          }
          for (int64_t i = 0; i < DI; ++i) {
            const T* __restrict__ xi = xcs + i * P;
            int64_t r = 0;
            for (; r + 4 <= DO; r += 4) {
              const T *__restrict__ g0 = gd + r * P, *__restrict__ g1 = g0 + P, *__restrict__ g2 = g1 + P,
                      *__restrict__ g3 = g2 + P;
              T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
              for (int64_t q = 0; q < P; ++q) {
                s0 += g0[q] * xi[q];
                s1 += g1[q] * xi[q];
                s2 += g2[q] * xi[q];
                s3 += g3[q] * xi[q];
              }
              gKe[(r * DI + i) * S] = s0;
              gKe[((r + 1) * DI + i) * S] = s1;
              gKe[((r + 2) * DI + i) * S] = s2;
              gKe[((r + 3) * DI + i) * S] = s3;
            }
            for (; r < DO; ++r) {
              T s = 0;
#pragma omp simd reduction(+ : s)
              for (int64_t q = 0; q < P; ++q) s += gd[r * P + q] * xi[q];
              gKe[(r * DI + i) * S] = s;
            }
          }
        }
        if (gK) matrices.grad_done(e, h);
        if (!gx_sums && !gc) continue;
        // u[i, q] = sum_r K[r, i] g[r, q];  gx[src, i, q] += u[i, q] c[q];  gc[q] = sum_i u[i, q] x[i, q]
        int64_t q0 = 0;
        if constexpr (FDI > 0) {  // the DI rows' sums in registers
          using V = typename Native<T>::V;
          constexpr int64_t L = Native<T>::L;
          for (; q0 + L <= P; q0 += L) {
            V s[FDI];
            small_matrix_rows<T, FDI, FDO, true>(Ke, S, gd, P, q0, s);
            for (int i = 0; i < FDI; ++i) *reinterpret_cast<V*>(u + i * P + q0) = s[i];
          }
        }
        for (int64_t i = 0; i < DI; ++i) {  // runtime sizes, and the channels left
          T* __restrict__ ui = u + i * P;
#pragma omp simd
          for (int64_t q = q0; q < P; ++q) {
            T s = 0;
            for (int64_t r = 0; r < DO; ++r) s += Ke[(r * DI + i) * S] * gd[r * P + q];
            ui[q] = s;
          }
        }
        if (gx_sums) {
          T* __restrict__ gxs = gx_sums + src[e] * in_width + h * DI * P;
          for (int64_t i = 0; i < DI; ++i) {
            if (ce) {
#pragma omp simd
              for (int64_t q = 0; q < P; ++q) gxs[i * P + q] += u[i * P + q] * ce[q];
            } else {
#pragma omp simd
              for (int64_t q = 0; q < P; ++q) gxs[i * P + q] += u[i * P + q];
            }
          }
        }
        if (gc) {
          T* __restrict__ gce = gc + eh * P;
#pragma omp simd
          for (int64_t q = 0; q < P; ++q) gce[q] = 0;
          for (int64_t i = 0; i < DI; ++i) {
#pragma omp simd
            for (int64_t q = 0; q < P; ++q) gce[q] += u[i * P + q] * xs[i * P + q];
          }
        }
      }
    }
  });
  acc.finish();
}

// The kernel instance for these sizes: constants for DI = DO in {1, 4, 9}, runtime sizes otherwise.
template <typename F>
F pick(const Dims& d, F f1, F f4, F f9, F f0) {
  if (d.DI == d.DO && d.DI == 1) return f1;
  if (d.DI == d.DO && d.DI == 4) return f4;
  if (d.DI == d.DO && d.DI == 9) return f9;
  return f0;
}

template <typename T, typename Source>
void run_forward(const at::Tensor& x, const Source& source, const at::Tensor& c, const at::Tensor& src,
                 const at::Tensor& dst, at::Tensor& out, const Dims& d) {
  auto kernel = pick(d, forward_kernel<T, 1, 1, Source>, forward_kernel<T, 4, 4, Source>,
                     forward_kernel<T, 9, 9, Source>, forward_kernel<T, 0, 0, Source>);
  kernel(x.data_ptr<T>(), source, c.numel() ? c.data_ptr<T>() : nullptr, src.data_ptr<int64_t>(),
         dst.data_ptr<int64_t>(), out.data_ptr<T>(), d);
}

template <typename T, typename Source>
void run_backward(const at::Tensor& grad_out, const at::Tensor& x, const Source& source, const at::Tensor& c,
                  const at::Tensor& src, const at::Tensor& dst, at::Tensor& gx, at::Tensor& gc, const Dims& d) {
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.numel() == d.N * d.H * d.DO * d.P, "grad_out must match out");
  // sizes known at compile time (DI = DO in {1, 4, 9}): the kernel-matrix gradient reads x transposed, (N, H, P, i)
  // with i zero-padded to a vector width, and accumulates in registers without horizontal sums
  const bool fixed = d.DI == d.DO && (d.DI == 1 || d.DI == 4 || d.DI == 9);
  at::Tensor xT;
  if (source.grad() && fixed) {
    xT = at::zeros({d.N, d.H, d.P, d.DI == 9 ? 16 : 4}, x.options());
    xT.narrow(3, 0, d.DI).copy_(x.transpose(2, 3));
  }
  auto kernel = pick(d, backward_kernel<T, 1, 1, Source>, backward_kernel<T, 4, 4, Source>,
                     backward_kernel<T, 9, 9, Source>, backward_kernel<T, 0, 0, Source>);
  kernel(grad_out.data_ptr<T>(), x.data_ptr<T>(), xT.defined() ? xT.data_ptr<T>() : nullptr, source,
         c.numel() ? c.data_ptr<T>() : nullptr, src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(),
         gx.defined() ? gx.data_ptr<T>() : nullptr, gc.defined() ? gc.data_ptr<T>() : nullptr, d);
}

template <typename T>
T* data_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& K, const at::Tensor& c, const at::Tensor& src,
                   const at::Tensor& dst, int64_t num_nodes) {
  Dims d = check(x, K, c, src, dst, num_nodes);
  auto out = at::zeros({d.N, d.H, d.DO, d.P}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_aggregate_forward", [&] {
    StoredMatrices<scalar_t> source{K.data_ptr<scalar_t>(), nullptr, d.H, d.DO * d.DI};
    run_forward<scalar_t>(x, source, c, src, dst, out, d);
  });
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& K,
                                 const at::Tensor& c, const at::Tensor& src, const at::Tensor& dst, bool need_x,
                                 bool need_K, bool need_c) {
  Dims d = check(x, K, c, src, dst, x.size(0));
  auto gx = need_x ? at::zeros_like(x) : at::Tensor();
  auto gK = need_K ? at::empty_like(K) : at::Tensor();
  auto gc = need_c && c.numel() ? at::empty_like(c) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_aggregate_backward", [&] {
    StoredMatrices<scalar_t> source{K.data_ptr<scalar_t>(), data_or_null<scalar_t>(gK), d.H, d.DO * d.DI};
    run_backward<scalar_t>(grad_out, x, source, c, src, dst, gx, gc, d);
  });
  return {gx, gK, gc};
}

// The same sums with the kernel matrices built from the head's terms (TermTiles). w (H, NT, E) contiguous; v (E, V) with unit column stride (e.g. a column slice of the kernel input); u (E, 1); rows (NT,);
// cg_term, cg_pos, cg_value (NZ,).
struct TermArgs {
  const at::Tensor &w, &v, &u, &rows, &cg_term, &cg_pos, &cg_value;
};

Dims check_terms(const at::Tensor& x, const TermArgs& a, const at::Tensor& c, const at::Tensor& src,
                 const at::Tensor& dst, int64_t num_nodes, int64_t d_out) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && c.is_contiguous(), "x must be (N, H, DI, P); x, c contiguous");
  check_indices(src, dst);
  Dims d{num_nodes, src.numel(), x.size(1), x.size(2), d_out, x.size(3)};
  TORCH_CHECK(x.size(0) == num_nodes && dst.numel() == d.E, "x must have num_nodes rows, src and dst one per edge");
  TORCH_CHECK(a.w.dim() == 3 && a.w.is_contiguous() && a.w.size(2) == d.E && a.w.size(0) == d.H,
              "w must be (H, NT, E), contiguous");
  TORCH_CHECK(a.v.dim() == 2 && a.v.size(0) == d.E && a.v.stride(1) == 1, "v must be (E, V) with unit column stride");
  TORCH_CHECK(a.u.numel() == d.E && a.u.is_contiguous(), "u must be (E, 1), contiguous");
  for (const at::Tensor* t : {&a.w, &a.v, &a.u, &a.cg_value, &c})
    TORCH_CHECK(t->numel() == 0 || t->scalar_type() == x.scalar_type(), "x, w, v, u, c and cg_value: one dtype");
  TORCH_CHECK(c.numel() == 0 || c.numel() == d.E * d.H * d.P, "c must be (E, H, P) or empty");
  const int64_t NT = a.w.size(1), NZ = a.cg_value.numel(), V = a.v.size(1);
  TORCH_CHECK(a.rows.numel() == NT && a.cg_term.numel() == NZ && a.cg_pos.numel() == NZ, "plan sizes differ");
  for (const at::Tensor* t : {&a.rows, &a.cg_term, &a.cg_pos})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "rows, cg_term, cg_pos: contiguous int64");
  const int64_t *rows = a.rows.data_ptr<int64_t>(), *term = a.cg_term.data_ptr<int64_t>(),
                *pos = a.cg_pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < NT; ++t) TORCH_CHECK(rows[t] >= -1 && rows[t] < V, "rows out of range");
  for (int64_t n = 0; n < NZ; ++n)
    TORCH_CHECK(term[n] >= 0 && term[n] < NT && pos[n] >= 0 && pos[n] < d.DO * d.DI, "cg entries out of range");
  return d;
}

// The nonzero CG entries of the plan, sorted by position (first) and by term (second).
template <typename T>
std::pair<std::vector<CGEntry<T>>, std::vector<CGEntry<T>>> cg_entries(const TermArgs& a) {
  const int64_t *term = a.cg_term.data_ptr<int64_t>(), *pos = a.cg_pos.data_ptr<int64_t>();
  const T* value = a.cg_value.data_ptr<T>();
  std::vector<CGEntry<T>> entries;
  for (int64_t z = 0; z < a.cg_value.numel(); ++z) entries.push_back({term[z], pos[z], value[z]});
  auto by_term = entries;
  std::stable_sort(entries.begin(), entries.end(), [](const auto& x, const auto& y) { return x.pos < y.pos; });
  std::stable_sort(by_term.begin(), by_term.end(), [](const auto& x, const auto& y) { return x.term < y.term; });
  return {entries, by_term};
}

template <typename T>
TermTiles<T> term_tiles(const TermArgs& a, const Dims& d, const std::pair<std::vector<CGEntry<T>>,
                        std::vector<CGEntry<T>>>& entries, T* gw, T* gv, T* gu) {
  return TermTiles<T>{a.w.data_ptr<T>(), a.v.data_ptr<T>(), a.u.data_ptr<T>(), a.rows.data_ptr<int64_t>(),
                      &entries.first, &entries.second, d.E, d.H, d.DO * d.DI, a.w.size(1), a.v.size(1),
                      a.v.stride(0), gw, gv, gu};
}

at::Tensor terms_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& v, const at::Tensor& u,
                         const at::Tensor& c, const at::Tensor& src, const at::Tensor& dst, int64_t num_nodes,
                         const at::Tensor& rows, const at::Tensor& cg_term, const at::Tensor& cg_pos,
                         const at::Tensor& cg_value, int64_t d_out) {
  TermArgs a{w, v, u, rows, cg_term, cg_pos, cg_value};
  Dims d = check_terms(x, a, c, src, dst, num_nodes, d_out);
  auto out = at::zeros({d.N, d.H, d.DO, d.P}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_terms_forward", [&] {
    const auto entries = cg_entries<scalar_t>(a);
    run_forward<scalar_t>(x, term_tiles<scalar_t>(a, d, entries, nullptr, nullptr, nullptr), c, src, dst, out, d);
  });
  return out;
}

std::vector<at::Tensor> terms_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                                       const at::Tensor& v, const at::Tensor& u, const at::Tensor& c,
                                       const at::Tensor& src, const at::Tensor& dst, const at::Tensor& rows,
                                       const at::Tensor& cg_term, const at::Tensor& cg_pos,
                                       const at::Tensor& cg_value, int64_t d_out, bool need_x, bool need_w,
                                       bool need_v, bool need_u, bool need_c) {
  TermArgs a{w, v, u, rows, cg_term, cg_pos, cg_value};
  Dims d = check_terms(x, a, c, src, dst, x.size(0), d_out);
  auto gx = need_x ? at::zeros_like(x) : at::Tensor();
  auto gw = need_w ? at::empty_like(w) : at::Tensor();
  auto gv = need_v ? at::empty({d.E, v.size(1)}, v.options()) : at::Tensor();
  auto gu = need_u ? at::empty_like(u) : at::Tensor();
  auto gc = need_c && c.numel() ? at::empty_like(c) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_terms_backward", [&] {
    const auto entries = cg_entries<scalar_t>(a);
    auto source = term_tiles<scalar_t>(a, d, entries, data_or_null<scalar_t>(gw), data_or_null<scalar_t>(gv),
                                       data_or_null<scalar_t>(gu));
    run_backward<scalar_t>(grad_out, x, source, c, src, dst, gx, gc, d);
  });
  return {gx, gw, gv, gu, gc};
}

// The terms pass as an autograd function in C++ (eager calls; a Python autograd.Function cost ~50 us per layer
// forward and backward for a small molecule). Its first derivatives are terms_backward; under create_graph it calls
// the Python function registered with set_terms_differentiable_backward (molkern.nn.fused: the gradients in
// differentiable torch operations). plan: rows, cg_term, cg_pos, cg_value, then cg, selection, constant (read by
// that function only).
pybind11::object* terms_differentiable_backward = nullptr;  // never destroyed: it must not outlive Python

void set_terms_differentiable_backward(pybind11::object function) {
  if (terms_differentiable_backward == nullptr) terms_differentiable_backward = new pybind11::object();
  *terms_differentiable_backward = std::move(function);
}

struct TermsAggregateFunction : public torch::autograd::Function<TermsAggregateFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& v, const at::Tensor& u, const at::Tensor& c, const at::Tensor& src,
                            const at::Tensor& dst, int64_t num_nodes, const std::vector<at::Tensor>& plan,
                            int64_t d_out) {
    TORCH_CHECK(plan.size() == 7, "terms_aggregate: plan must hold 7 tensors");
    ctx->save_for_backward({x, w, v, u, c});
    ctx->saved_data["edges"] = std::vector<at::Tensor>{src, dst};
    ctx->saved_data["plan"] = plan;
    ctx->saved_data["d_out"] = d_out;
    return terms_forward(x, w, v, u, c, src, dst, num_nodes, plan[0], plan[1], plan[2], plan[3], d_out);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto edges = ctx->saved_data["edges"].toTensorVector();
    const auto plan = ctx->saved_data["plan"].toTensorVector();
    const int64_t d_out = ctx->saved_data["d_out"].toInt();
    std::vector<bool> need(5);
    for (int k = 0; k < 5; ++k) need[k] = ctx->needs_input_grad(k);
    need[4] = need[4] && saved[4].numel() > 0;
    const at::Tensor grad = grads[0].contiguous();
    torch::autograd::variable_list out(10);
    if (!at::GradMode::is_enabled()) {  // a first derivative only: the fused pass
      const auto g = terms_backward(grad, saved[0], saved[1], saved[2], saved[3], saved[4], edges[0], edges[1],
                                    plan[0], plan[1], plan[2], plan[3], d_out, need[0], need[1], need[2], need[3],
                                    need[4]);
      for (int k = 0; k < 5; ++k) out[k] = need[k] ? g[k] : at::Tensor();
      return out;
    }
    TORCH_CHECK(terms_differentiable_backward != nullptr, "terms_aggregate: no differentiable backward registered");
    pybind11::gil_scoped_acquire gil;
    const auto g = (*terms_differentiable_backward)(grad, saved[0], saved[1], saved[2], saved[3], saved[4], edges[0],
                                                    edges[1], plan, d_out, need)
                       .cast<std::vector<std::optional<at::Tensor>>>();
    for (int k = 0; k < 5; ++k)
      if (g[k].has_value()) out[k] = *g[k];
    return out;
  }
};

at::Tensor terms_aggregate(const at::Tensor& x, const at::Tensor& w, const at::Tensor& v, const at::Tensor& u,
                           const at::Tensor& c, const at::Tensor& src, const at::Tensor& dst, int64_t num_nodes,
                           const std::vector<at::Tensor>& plan, int64_t d_out) {
  return TermsAggregateFunction::apply(x, w, v, u, c, src, dst, num_nodes, plan, d_out);
}

// acc[i C + a] = sum_r x_i[rows[r]] B[r, a] for NR rows x_i = x + i D (a < C; B (R, C) row-major): NR rows at
// once share each load of B; a single row sums even and odd r apart, so that at least four independent sums are
// in flight (an FMA's latency is several cycles).
template <typename T, int NR>
inline void block_rows(const T* __restrict__ x, int64_t D, const int64_t* __restrict__ rows, const T* __restrict__ B,
                       int64_t R, int64_t C, T* __restrict__ acc) {
  using V = typename Lanes<T>::V;
  constexpr int64_t L = Lanes<T>::L;
  int64_t a = 0;
  for (; a + 2 * L <= C; a += 2 * L) {
    V s[NR][2] = {};
    int64_t r = 0;
    if (NR == 1) {
      V t0 = {}, t1 = {};
      for (; r + 1 < R; r += 2) {
        const V* b = reinterpret_cast<const V*>(B + r * C + a);
        const V* c = reinterpret_cast<const V*>(B + (r + 1) * C + a);
        const T xv = x[rows[r]], yv = x[rows[r + 1]];
        s[0][0] += b[0] * xv;
        s[0][1] += b[1] * xv;
        t0 += c[0] * yv;
        t1 += c[1] * yv;
      }
      s[0][0] += t0;
      s[0][1] += t1;
    }
    for (; r < R; ++r) {
      const V* b = reinterpret_cast<const V*>(B + r * C + a);
      const V b0 = b[0], b1 = b[1];
      const int64_t k = rows[r];
      for (int i = 0; i < NR; ++i) {
        const T xv = x[i * D + k];
        s[i][0] += b0 * xv;
        s[i][1] += b1 * xv;
      }
    }
    for (int i = 0; i < NR; ++i) {
      *reinterpret_cast<V*>(acc + i * C + a) = s[i][0];
      *reinterpret_cast<V*>(acc + i * C + a + L) = s[i][1];
    }
  }
  for (; a < C; ++a)
    for (int i = 0; i < NR; ++i) {
      T sum = T(0);
      for (int64_t r = 0; r < R; ++r) sum += B[r * C + a] * x[i * D + rows[r]];
      acc[i * C + a] = sum;
    }
}

// block_rows for count = 1 to 4 rows (acc: count C entries).
template <typename T>
inline void block_rows_up_to_4(int64_t count, const T* x, int64_t D, const int64_t* rows, const T* B, int64_t R,
                               int64_t C, T* acc) {
  switch (count) {
    case 4: block_rows<T, 4>(x, D, rows, B, R, C, acc); break;
    case 3: block_rows<T, 3>(x, D, rows, B, R, C, acc); break;
    case 2: block_rows<T, 2>(x, D, rows, B, R, C, acc); break;
    default: block_rows<T, 1>(x, D, rows, B, R, C, acc);
  }
}

// out[a d + i] += s (m^T y)[a, i] for every a < W, i < d: m (U, W), y (U, d); up to 4 components i at a time.
template <typename T>
void add_transposed_product(const T* m, const T* y, int64_t U, int64_t W, int64_t d, T s, T* out, std::vector<T>& acc,
                            std::vector<int64_t>& rows) {
  acc.resize(4 * W);
  rows.resize(U);
  for (int64_t u = 0; u < U; ++u) rows[u] = u * d;  // component i of channel u: y[i + u d]
  for (int64_t i = 0; i < d; i += 4) {
    const int64_t count = std::min<int64_t>(4, d - i);
    block_rows_up_to_4<T>(count, y + i, 1, rows.data(), m, U, W, acc.data());
    for (int64_t j = 0; j < count; ++j)
      for (int64_t a = 0; a < W; ++a) out[a * d + i + j] += s * acc[j * W + a];
  }
}

// Self-connection with scalar node attributes (molkern.nn.self_connection, constant parameters): per node n and
// (input block -> output block) pair, the weight matrix sum_v z[n, v] S[v, pair] applied to the U channels of each
// of the block's d components. S (V, 2 C): columns [0, C) hold each pair's (U, W) matrix, [C, 2 C) the same as
// (W, U). plan (P, 6) int64 rows: x column start, U, out column start, W, d, first column of the pair's matrix.
// transpose: the adjoint (input gradient), out and x swap roles. A node with one nonzero attribute (one-hot atom
// types) reads that attribute's matrices in place.
template <typename T>
void attribute_linear_kernel(const T* x, const T* z, const T* S, const int64_t* plan, T* out, int64_t N, int64_t V,
                             int64_t C2, int64_t P, int64_t d_x, int64_t d_out, bool transpose) {
  const int64_t layout = transpose ? C2 / 2 : 0;  // the (W, U) copies for the adjoint
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> sum, acc;  // the node's matrix when it mixes attributes; output columns
    std::vector<int64_t> rows;
    for (int64_t n = begin; n < end; ++n) {
      const T* zn = z + n * V;
      int64_t nonzero = 0, only = 0;
      for (int64_t v = 0; v < V; ++v)
        if (zn[v] != T(0)) ++nonzero, only = v;
      if (nonzero == 0) continue;
      const T scale = nonzero == 1 ? zn[only] : T(1);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t* r = plan + 6 * p;
        const int64_t xs = r[0], U = r[1], os = r[2], W = r[3], d = r[4], col = r[5] + layout;
        const T* w = S + only * C2 + col;  // (U, W), or (W, U) for the adjoint
        if (nonzero > 1) {
          sum.assign(U * W, T(0));
          for (int64_t v = 0; v < V; ++v) {
            const T zv = zn[v];
            const T* Sv = S + v * C2 + col;
            if (zv != T(0))
#pragma omp simd
              for (int64_t k = 0; k < U * W; ++k) sum[k] += zv * Sv[k];
          }
          w = sum.data();
        }
        if (!transpose)  // out[os + a d + i] += sum_u w[u, a] x[xs + u d + i]
          add_transposed_product(w, x + n * d_x + xs, U, W, d, scale, out + n * d_out + os, acc, rows);
        else  // out[xs + u d + i] += sum_a w[a, u] g[os + a d + i]  (x: the gradient, out: the input's)
          add_transposed_product(w, x + n * d_x + os, W, U, d, scale, out + n * d_out + xs, acc, rows);
      }
    }
  });
}

at::Tensor attribute_linear(const at::Tensor& x, const at::Tensor& z, const at::Tensor& S, const at::Tensor& plan,
                            int64_t out_dim, bool transpose) {
  TORCH_CHECK(x.dim() == 2 && z.dim() == 2 && S.dim() == 2 && plan.dim() == 2 && plan.size(1) == 6,
              "x (N, D), z (N, V), S (V, C) and plan (P, 6) expected");
  TORCH_CHECK(x.is_contiguous() && z.is_contiguous() && S.is_contiguous() && plan.is_contiguous(),
              "inputs must be contiguous");
  TORCH_CHECK(x.scalar_type() == z.scalar_type() && x.scalar_type() == S.scalar_type(), "one dtype expected");
  TORCH_CHECK(plan.scalar_type() == at::kLong && z.size(0) == x.size(0) && S.size(0) == z.size(1), "shapes differ");
  const int64_t* q = plan.data_ptr<int64_t>();
  const int64_t input_side = transpose ? out_dim : x.size(1), output_side = transpose ? x.size(1) : out_dim;
  for (int64_t p = 0; p < plan.size(0); ++p, q += 6)  // the map's input (xs, U d) and output (os, W d) columns
    TORCH_CHECK(std::all_of(q, q + 6, [](int64_t k) { return k >= 0; }) && q[0] + q[1] * q[4] <= input_side &&
                q[2] + q[3] * q[4] <= output_side && 2 * (q[5] + q[1] * q[3]) <= S.size(1),
                "attribute_linear: plan row ", p, " lies outside x, the output or S");
  auto out = at::zeros({x.size(0), out_dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attribute_linear", [&] {
    attribute_linear_kernel<scalar_t>(x.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), S.data_ptr<scalar_t>(),
                                      plan.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), x.size(0), z.size(1),
                                      S.size(1), plan.size(0), x.size(1), out_dim, transpose);
  });
  return out;
}

// attribute_linear as an autograd function in C++ (as block_linear below): the input gradient is the adjoint pass
// (transpose flipped), itself differentiable, so derivatives of any order work. z and S are constants.
struct AttributeLinearFunction : public torch::autograd::Function<AttributeLinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& z,
                            const at::Tensor& S, const at::Tensor& plan, int64_t out_dim, int64_t in_dim,
                            bool transpose) {
    ctx->saved_data["constants"] = std::vector<at::Tensor>{z, S, plan};
    ctx->saved_data["dims"] = std::vector<int64_t>{out_dim, in_dim};
    ctx->saved_data["transpose"] = transpose;
    return attribute_linear(x, z, S, plan, transpose ? in_dim : out_dim, transpose);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto c = ctx->saved_data["constants"].toTensorVector();
    const auto dims = ctx->saved_data["dims"].toIntVector();
    torch::autograd::variable_list out(7);
    out[0] = AttributeLinearFunction::apply(grads[0].contiguous(), c[0], c[1], c[2], dims[0], dims[1],
                                            !ctx->saved_data["transpose"].toBool());
    return out;
  }
};

// out (N, out_dim) = the self-connection of x (N, in_dim), differentiable in x
at::Tensor attribute_linear_apply(const at::Tensor& x, const at::Tensor& z, const at::Tensor& S, const at::Tensor& plan,
                                  int64_t out_dim, int64_t in_dim) {
  return AttributeLinearFunction::apply(x, z, S, plan, out_dim, in_dim, false);
}

// out = x @ M (+ bias) for a constant matrix M stored as dense blocks (molkern.nn.block_linear): block g reads the
// x columns rows[r0 : r0 + R] and adds (x[:, rows] @ B_g) into the out columns cols[c0 : c0 + C], with B_g (R, C)
// row-major at weights[w0]; groups (G, 5) int64 rows: r0, R, c0, C, w0. An equivariant linear map has a few
// (channels x channels) blocks per irrep component, ~1/9 of the dense matrix's entries at lmax 2.

template <typename T>
void block_linear_kernel(const T* x, const int64_t* groups, const int64_t* rows, const int64_t* cols, const T* weights,
                         const T* bias, T* out, int64_t N, int64_t D_in, int64_t D_out, int64_t G) {
  constexpr int NR = 4;
  int64_t widest = 0;
  for (int64_t g = 0; g < G; ++g) widest = std::max(widest, groups[5 * g + 3]);
  at::parallel_for(0, (N + NR - 1) / NR, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(NR * widest);
    for (int64_t n = begin * NR; n < std::min(end * NR, N); n += NR) {
      const int64_t count = std::min<int64_t>(NR, N - n);
      if (bias != nullptr)
        for (int64_t i = 0; i < count; ++i) std::copy(bias, bias + D_out, out + (n + i) * D_out);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t* q = groups + 5 * g;
        const int64_t R = q[1], C = q[3];
        block_rows_up_to_4<T>(count, x + n * D_in, D_in, rows + q[0], weights + q[4], R, C, acc.data());
        const int64_t* c = cols + q[2];
        for (int64_t i = 0; i < count; ++i) {
          T* o = out + (n + i) * D_out;
          for (int64_t k = 0; k < C; ++k) o[c[k]] += acc[i * C + k];
        }
      }
    }
  });
}

at::Tensor block_linear(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& groups, const at::Tensor& rows,
                        const at::Tensor& cols, const at::Tensor& weights, int64_t out_dim) {
  TORCH_CHECK(x.dim() == 2 && groups.dim() == 2 && groups.size(1) == 5, "x (N, D) and groups (G, 5) expected");
  TORCH_CHECK(x.is_contiguous() && groups.is_contiguous() && rows.is_contiguous() && cols.is_contiguous() &&
              weights.is_contiguous() && bias.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(groups.scalar_type() == at::kLong && rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong,
              "groups, rows and cols must be int64");
  TORCH_CHECK(x.scalar_type() == weights.scalar_type() && (bias.numel() == 0 || bias.scalar_type() == x.scalar_type()),
              "one dtype expected");
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == out_dim, "bias must be empty or have out_dim entries");
  const int64_t* q = groups.data_ptr<int64_t>();
  for (int64_t g = 0; g < groups.size(0); ++g, q += 5)
    TORCH_CHECK(q[0] >= 0 && q[1] >= 0 && q[0] + q[1] <= rows.numel() && q[2] >= 0 && q[3] >= 0 &&
                q[2] + q[3] <= cols.numel() && q[4] >= 0 && q[4] + q[1] * q[3] <= weights.numel(),
                "block ", g, " lies outside rows, cols or weights");
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* c = cols.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(r, r + rows.numel(), [&](int64_t k) { return k >= 0 && k < x.size(1); }) &&
              std::all_of(c, c + cols.numel(), [&](int64_t k) { return k >= 0 && k < out_dim; }),
              "block rows must index x's columns and cols the output's");
  auto out = bias.numel() ? at::empty({x.size(0), out_dim}, x.options()) : at::zeros({x.size(0), out_dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_linear", [&] {
    block_linear_kernel<scalar_t>(x.data_ptr<scalar_t>(), groups.data_ptr<int64_t>(), rows.data_ptr<int64_t>(),
                                  cols.data_ptr<int64_t>(), weights.data_ptr<scalar_t>(),
                                  bias.numel() ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                                  x.size(0), x.size(1), out_dim, groups.size(0));
  });
  return out;
}

// block_linear as an autograd function in C++ (a Python autograd.Function costs ~15 us per call, as much as the
// product itself for a small molecule): the input gradient is the same product with the transposed blocks
// (adjoint), itself differentiable, so derivatives of any order work. The matrix and bias are constants.
struct BlockLinearFunction : public torch::autograd::Function<BlockLinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bias,
                            const at::Tensor& groups, const at::Tensor& rows, const at::Tensor& cols,
                            const at::Tensor& weights, const at::Tensor& adj_groups, const at::Tensor& adj_rows,
                            const at::Tensor& adj_cols, const at::Tensor& adj_weights, int64_t out_dim) {
    ctx->saved_data["plan"] = std::vector<at::Tensor>{groups, rows, cols, weights};
    ctx->saved_data["adjoint"] = std::vector<at::Tensor>{adj_groups, adj_rows, adj_cols, adj_weights};
    ctx->saved_data["in_dim"] = x.size(1);
    ctx->saved_data["out_dim"] = out_dim;
    return block_linear(x, bias, groups, rows, cols, weights, out_dim);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto plan = ctx->saved_data["plan"].toTensorVector();
    const auto adjoint = ctx->saved_data["adjoint"].toTensorVector();
    const at::Tensor grad_x = BlockLinearFunction::apply(
        grads[0].contiguous(), grads[0].new_empty({0}), adjoint[0], adjoint[1], adjoint[2], adjoint[3], plan[0],
        plan[1], plan[2], plan[3], ctx->saved_data["in_dim"].toInt());
    torch::autograd::variable_list out(11);
    out[0] = grad_x;
    return out;
  }
};

at::Tensor block_linear_apply(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& groups,
                              const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& weights,
                              const at::Tensor& adj_groups, const at::Tensor& adj_rows, const at::Tensor& adj_cols,
                              const at::Tensor& adj_weights, int64_t out_dim) {
  return BlockLinearFunction::apply(x, bias, groups, rows, cols, weights, adj_groups, adj_rows, adj_cols, adj_weights,
                                    out_dim);
}

}  // namespace

namespace molkern {
void register_constant_functions(pybind11::module& m);  // constant_functions.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused depthwise gather, kernel product and scatter-sum");
  m.def("backward", &backward, "its gradients with respect to x, K and c");
  m.def("terms_forward", &terms_forward, "the same sums, kernel matrices built per edge from the head's terms");
  m.def("terms_backward", &terms_backward, "its gradients with respect to x, w, v, u and c");
  m.def("terms_aggregate", &terms_aggregate, "terms_forward as an autograd function (eager calls)");
  m.def("set_terms_differentiable_backward", &set_terms_differentiable_backward,
        "the Python function terms_aggregate's backward calls under create_graph");
  m.def("attribute_linear", &attribute_linear_apply, "self-connection with per-node attribute-weighted matrices "
        "(differentiable)");
  m.def("block_linear", &block_linear_apply, "product with a constant matrix stored as dense blocks (differentiable)");
  molkern::register_constant_functions(m);
}
