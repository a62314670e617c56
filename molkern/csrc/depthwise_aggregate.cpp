// Fused depthwise convolution sum: out[i, k] = sum_{e: dst[e] = i} K[e, k] (x[src[e], k] * c[e, k]).
//
// One pass over the edges, reading per edge only its kernel matrices K (H x DO x DI), channel weights c (H x P) and
// the source node's features (cache-resident: node tensors are small); the per-edge (E x H x D x P) tensors of the
// unfused form (gathered features, scaled features, messages) are never written. Backward likewise.
//
// Layouts (all contiguous, head-major as molkern.nn.depthwise): x (N, H, DI, P), K (E, H, DO, DI), c (E, H, P) or
// an empty tensor (no channel weights), src / dst (E,) int64, out (N, H, DO, P). Threads (at::parallel_for over
// edge ranges) accumulate node sums into private buffers that are added up at the end.

// Also: attribute_linear, the self-connection with scalar node attributes under constant parameters (below).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

struct Dims {
  int64_t N, E, H, DI, DO, P;
};

Dims check(const at::Tensor& x, const at::Tensor& K, const at::Tensor& c, const at::Tensor& src, const at::Tensor& dst,
           int64_t num_nodes) {
  TORCH_CHECK(x.dim() == 4 && K.dim() == 4, "x must be (N, H, DI, P) and K (E, H, DO, DI)");
  TORCH_CHECK(x.is_contiguous() && K.is_contiguous() && c.is_contiguous(), "x, K and c must be contiguous");
  TORCH_CHECK(x.scalar_type() == K.scalar_type(), "x and K must have one dtype");
  TORCH_CHECK(src.scalar_type() == at::kLong && dst.scalar_type() == at::kLong, "src and dst must be int64");
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

// The kernels take DI and DO as template constants for the common sizes (1, 4, 9: lmax 0, 1, 2 features; 0 =
// read from Dims) so that the loops over the matrix entries unroll and the sums stay in registers; the innermost
// loop runs over the P channels of a head (SIMD).
template <typename T, int FDI, int FDO>
void forward_kernel(const T* x, const T* K, const T* c, const int64_t* src, const int64_t* dst, T* out, Dims d) {
  const int64_t DI = FDI ? FDI : d.DI, DO = FDO ? FDO : d.DO, P = d.P;
  const int64_t in_width = d.H * DI * P, out_width = d.H * DO * P;
  Accumulators<T> acc(out, d.N * out_width);
  at::parallel_for(0, d.E, 256, [&](int64_t begin, int64_t end) {
    T* sums = acc.get();
    for (int64_t e = begin; e < end; ++e) {
      for (int64_t h = 0; h < d.H; ++h) {
        const T* __restrict__ xs = x + src[e] * in_width + h * DI * P;
        const T* __restrict__ Ke = K + (e * d.H + h) * DO * DI;
        const T* __restrict__ ce = c ? c + (e * d.H + h) * P : nullptr;
        T* __restrict__ o = sums + dst[e] * out_width + h * DO * P;
        for (int64_t r = 0; r < DO; ++r) {
          const T* __restrict__ Kr = Ke + r * DI;
#pragma omp simd
          for (int64_t q = 0; q < P; ++q) {
            T s = 0;
            for (int64_t i = 0; i < DI; ++i) s += Kr[i] * xs[i * P + q];
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

template <typename T, int FDI, int FDO>
void backward_kernel(const T* g, const T* x, const T* xT, const T* K, const T* c, const int64_t* src,
                     const int64_t* dst, T* gx, T* gK, T* gc, Dims d) {
  const int64_t DI = FDI ? FDI : d.DI, DO = FDO ? FDO : d.DO, P = d.P;
  constexpr int DIP = padded(FDI);
  const int64_t in_width = d.H * DI * P, out_width = d.H * DO * P;
  Accumulators<T> acc(gx, gx ? d.N * in_width : 0);
  at::parallel_for(0, d.E, 256, [&](int64_t begin, int64_t end) {
    T* gx_sums = gx ? acc.get() : nullptr;
    std::vector<T> scratch(2 * DI * P);  // x c and u (below) of one edge and head
    T* __restrict__ xc = scratch.data();
    T* __restrict__ u = xc + DI * P;
    for (int64_t e = begin; e < end; ++e) {
      for (int64_t h = 0; h < d.H; ++h) {
        const int64_t eh = e * d.H + h;
        const T* __restrict__ xs = x + src[e] * in_width + h * DI * P;
        const T* __restrict__ gd = g + dst[e] * out_width + h * DO * P;
        const T* __restrict__ Ke = K + eh * DO * DI;
        const T* __restrict__ ce = c ? c + eh * P : nullptr;
        bool done = false;
        if constexpr (FDO > 0) {
          if (gK && xT) {  // gK[r, :] = sum_q (g[r, q] c[q]) xT[q, :]: DO vector accumulators over the padded i
            const T* __restrict__ xt = xT + (src[e] * d.H + h) * P * DIP;
            T a[FDO][DIP] = {};
            for (int64_t q = 0; q < P; ++q) {
              const T cq = ce ? ce[q] : T(1);
              for (int r = 0; r < FDO; ++r) {
                const T grq = gd[r * P + q] * cq;
#pragma omp simd
                for (int i = 0; i < DIP; ++i) a[r][i] += grq * xt[q * DIP + i];
              }
            }
            T* __restrict__ gKe = gK + eh * DO * DI;
            for (int r = 0; r < FDO; ++r)
              for (int i = 0; i < FDI; ++i) gKe[r * FDI + i] = a[r][i];
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
          T* __restrict__ gKe = gK + eh * DO * DI;
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
              gKe[r * DI + i] = s0;
              gKe[(r + 1) * DI + i] = s1;
              gKe[(r + 2) * DI + i] = s2;
              gKe[(r + 3) * DI + i] = s3;
            }
            for (; r < DO; ++r) {
              T s = 0;
#pragma omp simd reduction(+ : s)
              for (int64_t q = 0; q < P; ++q) s += gd[r * P + q] * xi[q];
              gKe[r * DI + i] = s;
            }
          }
        }
        if (!gx_sums && !gc) continue;
        // u[i, q] = sum_r K[r, i] g[r, q];  gx[src, i, q] += u[i, q] c[q];  gc[q] = sum_i u[i, q] x[i, q]
        for (int64_t i = 0; i < DI; ++i) {
          T* __restrict__ ui = u + i * P;
#pragma omp simd
          for (int64_t q = 0; q < P; ++q) {
            T s = 0;
            for (int64_t r = 0; r < DO; ++r) s += Ke[r * DI + i] * gd[r * P + q];
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

at::Tensor forward(const at::Tensor& x, const at::Tensor& K, const at::Tensor& c, const at::Tensor& src,
                   const at::Tensor& dst, int64_t num_nodes) {
  Dims d = check(x, K, c, src, dst, num_nodes);
  auto out = at::zeros({d.N, d.H, d.DO, d.P}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_aggregate_forward", [&] {
    auto kernel = pick(d, forward_kernel<scalar_t, 1, 1>, forward_kernel<scalar_t, 4, 4>, forward_kernel<scalar_t, 9, 9>,
                       forward_kernel<scalar_t, 0, 0>);
    kernel(x.data_ptr<scalar_t>(), K.data_ptr<scalar_t>(),
                             c.numel() ? c.data_ptr<scalar_t>() : nullptr, src.data_ptr<int64_t>(),
                             dst.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), d);
  });
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& K,
                                 const at::Tensor& c, const at::Tensor& src, const at::Tensor& dst, bool need_x,
                                 bool need_K, bool need_c) {
  Dims d = check(x, K, c, src, dst, x.size(0));
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.numel() == d.N * d.H * d.DO * d.P, "grad_out must match out");
  auto gx = need_x ? at::zeros_like(x) : at::Tensor();
  auto gK = need_K ? at::empty_like(K) : at::Tensor();
  auto gc = need_c && c.numel() ? at::empty_like(c) : at::Tensor();
  // sizes known at compile time (DI = DO in {1, 4, 9}): the kernel-matrix gradient reads x transposed, (N, H, P, i)
  // with i zero-padded to a vector width, and accumulates in registers without horizontal sums
  const bool fixed = d.DI == d.DO && (d.DI == 1 || d.DI == 4 || d.DI == 9);
  at::Tensor xT;
  if (need_K && fixed) {
    const int64_t pad = d.DI == 9 ? 16 : 4;
    xT = at::zeros({d.N, d.H, d.P, pad}, x.options());
    xT.narrow(3, 0, d.DI).copy_(x.transpose(2, 3));
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_aggregate_backward", [&] {
    auto kernel = pick(d, backward_kernel<scalar_t, 1, 1>, backward_kernel<scalar_t, 4, 4>,
                       backward_kernel<scalar_t, 9, 9>, backward_kernel<scalar_t, 0, 0>);
    kernel(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), xT.defined() ? xT.data_ptr<scalar_t>() : nullptr,
           K.data_ptr<scalar_t>(),
                              c.numel() ? c.data_ptr<scalar_t>() : nullptr, src.data_ptr<int64_t>(),
                              dst.data_ptr<int64_t>(), gx.defined() ? gx.data_ptr<scalar_t>() : nullptr,
                              gK.defined() ? gK.data_ptr<scalar_t>() : nullptr,
                              gc.defined() ? gc.data_ptr<scalar_t>() : nullptr, d);
  });
  return {gx, gK, gc};
}

// Self-connection with scalar node attributes (molkern.nn.self_connection, constant parameters): per node n and
// (input block -> output block) pair, the (W, U) weight matrix sum_v z[n, v] S[v, pair] applied to the U channels
// of each of the block's d components. plan (P, 6) int64 rows: x column start, U, out column start, W, d, first
// column of the pair's (W, U) matrix in S. transpose: the adjoint (input gradient), out and x swap roles.
template <typename T>
void attribute_linear_kernel(const T* x, const T* z, const T* S, const int64_t* plan, T* out, int64_t N, int64_t V,
                             int64_t C, int64_t P, int64_t d_x, int64_t d_out, bool transpose) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> wt, buf;  // the node's matrix transposed (U, W); a (d, W) buffer of outputs or gradients
    for (int64_t n = begin; n < end; ++n) {
      const T* zn = z + n * V;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t* r = plan + 6 * p;
        const int64_t xs = r[0], U = r[1], os = r[2], W = r[3], d = r[4], col = r[5];
        wt.assign(U * W, T(0));
        for (int64_t v = 0; v < V; ++v) {
          const T zv = zn[v];
          if (zv == T(0)) continue;  // one-hot attributes: one row
          const T* Sv = S + v * C + col;  // (W, U)
          for (int64_t a = 0; a < W; ++a)
            for (int64_t u = 0; u < U; ++u) wt[u * W + a] += zv * Sv[a * U + u];
        }
        buf.assign(d * W, T(0));
        T* __restrict__ bt = buf.data();
        const T* __restrict__ w = wt.data();
        if (!transpose) {  // out[os + a d + i] += sum_u w[a, u] x[xs + u d + i]
          const T* xn = x + n * d_x + xs;
          for (int64_t u = 0; u < U; ++u)
            for (int64_t i = 0; i < d; ++i) {
              const T xv = xn[u * d + i];
#pragma omp simd
              for (int64_t a = 0; a < W; ++a) bt[i * W + a] += w[u * W + a] * xv;
            }
          T* on = out + n * d_out + os;
          for (int64_t a = 0; a < W; ++a)
            for (int64_t i = 0; i < d; ++i) on[a * d + i] += bt[i * W + a];
        } else {  // out[xs + u d + i] += sum_a w[a, u] g[os + a d + i]  (x: the gradient, out: the input's)
          const T* gn = x + n * d_x + os;
          for (int64_t a = 0; a < W; ++a)
            for (int64_t i = 0; i < d; ++i) bt[i * W + a] = gn[a * d + i];
          T* on = out + n * d_out + xs;
          for (int64_t u = 0; u < U; ++u)
            for (int64_t i = 0; i < d; ++i) {
              T acc = 0;
#pragma omp simd reduction(+ : acc)
              for (int64_t a = 0; a < W; ++a) acc += w[u * W + a] * bt[i * W + a];
              on[u * d + i] += acc;
            }
        }
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
  auto out = at::zeros({x.size(0), out_dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attribute_linear", [&] {
    attribute_linear_kernel<scalar_t>(x.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), S.data_ptr<scalar_t>(),
                                      plan.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), x.size(0), z.size(1),
                                      S.size(1), plan.size(0), x.size(1), out_dim, transpose);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused depthwise gather, kernel product and scatter-sum");
  m.def("backward", &backward, "its gradients with respect to x, K and c");
  m.def("attribute_linear", &attribute_linear, "self-connection with per-node attribute-weighted matrices");
}
