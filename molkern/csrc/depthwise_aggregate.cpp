// Fused depthwise convolution sum: out[i, k] = sum_{e: dst[e] = i} K[e, k] (x[src[e], k] * c[e, k]).
//
// One pass over the edges, reading per edge only its kernel matrices K (H x DO x DI), channel weights c (H x P) and
// the source node's features (cache-resident: node tensors are small); the per-edge (E x H x D x P) tensors of the
// unfused form (gathered features, scaled features, messages) are never written. Backward likewise.
//
// Layouts (all contiguous, head-major as molkern.nn.depthwise): x (N, H, DI, P), K (E, H, DO, DI), c (E, H, P) or
// an empty tensor (no channel weights), src / dst (E,) int64, out (N, H, DO, P). Threads (at::parallel_for over
// edge ranges) accumulate node sums into private buffers that are added up at the end.

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

template <typename T>
void forward_kernel(const T* x, const T* K, const T* c, const int64_t* src, const int64_t* dst, T* out, Dims d) {
  const int64_t in_width = d.H * d.DI * d.P, out_width = d.H * d.DO * d.P;
  Accumulators<T> acc(out, d.N * out_width);
  at::parallel_for(0, d.E, 256, [&](int64_t begin, int64_t end) {
    T* sums = acc.get();
    std::vector<T> scaled(d.DI * d.P);
    for (int64_t e = begin; e < end; ++e) {
      for (int64_t h = 0; h < d.H; ++h) {
        const T* xs = x + src[e] * in_width + h * d.DI * d.P;
        const T* Ke = K + (e * d.H + h) * d.DO * d.DI;
        T* o = sums + dst[e] * out_width + h * d.DO * d.P;
        if (c) {
          const T* ce = c + (e * d.H + h) * d.P;
          for (int64_t i = 0; i < d.DI; ++i)
            for (int64_t q = 0; q < d.P; ++q) scaled[i * d.P + q] = xs[i * d.P + q] * ce[q];
          xs = scaled.data();
        }
        for (int64_t r = 0; r < d.DO; ++r)
          for (int64_t i = 0; i < d.DI; ++i) {
            const T k = Ke[r * d.DI + i];
            const T* __restrict__ xi = xs + i * d.P;
            T* __restrict__ orow = o + r * d.P;
#pragma omp simd
            for (int64_t q = 0; q < d.P; ++q) orow[q] += k * xi[q];
          }
      }
    }
  });
  acc.finish();
}

template <typename T>
void backward_kernel(const T* g, const T* x, const T* K, const T* c, const int64_t* src, const int64_t* dst, T* gx,
                     T* gK, T* gc, Dims d) {
  const int64_t in_width = d.H * d.DI * d.P, out_width = d.H * d.DO * d.P;
  Accumulators<T> acc(gx, gx ? d.N * in_width : 0);
  at::parallel_for(0, d.E, 256, [&](int64_t begin, int64_t end) {
    T* gx_sums = gx ? acc.get() : nullptr;
    std::vector<T> u(d.DI * d.P), scaled(d.DI * d.P);
    for (int64_t e = begin; e < end; ++e) {
      for (int64_t h = 0; h < d.H; ++h) {
        const int64_t eh = e * d.H + h;
        const T* xs = x + src[e] * in_width + h * d.DI * d.P;
        const T* gd = g + dst[e] * out_width + h * d.DO * d.P;
        const T* Ke = K + eh * d.DO * d.DI;
        const T* ce = c ? c + eh * d.P : nullptr;
        if (gK) {  // gK[r, i] = sum_q g[r, q] x[i, q] c[q]
          const T* xc = xs;
          if (ce) {
            for (int64_t i = 0; i < d.DI; ++i)
              for (int64_t q = 0; q < d.P; ++q) scaled[i * d.P + q] = xs[i * d.P + q] * ce[q];
            xc = scaled.data();
          }
          for (int64_t r = 0; r < d.DO; ++r)
            for (int64_t i = 0; i < d.DI; ++i) {
              T s = 0;
              const T* __restrict__ gr = gd + r * d.P;
              const T* __restrict__ xi = xc + i * d.P;
#pragma omp simd reduction(+ : s)
              for (int64_t q = 0; q < d.P; ++q) s += gr[q] * xi[q];
              gK[eh * d.DO * d.DI + r * d.DI + i] = s;
            }
        }
        if (gx_sums || gc) {  // u = K^T g; gx[src] += u c; gc[q] = sum_i u[i, q] x[i, q]
          std::fill(u.begin(), u.end(), T(0));
          for (int64_t r = 0; r < d.DO; ++r)
            for (int64_t i = 0; i < d.DI; ++i) {
              const T k = Ke[r * d.DI + i];
              T* __restrict__ ui = u.data() + i * d.P;
              const T* __restrict__ gr = gd + r * d.P;
#pragma omp simd
              for (int64_t q = 0; q < d.P; ++q) ui[q] += k * gr[q];
            }
          if (gx_sums) {
            T* gxs = gx_sums + src[e] * in_width + h * d.DI * d.P;
            for (int64_t i = 0; i < d.DI; ++i)
              for (int64_t q = 0; q < d.P; ++q) gxs[i * d.P + q] += ce ? u[i * d.P + q] * ce[q] : u[i * d.P + q];
          }
          if (gc) {
            T* gce = gc + eh * d.P;
            for (int64_t q = 0; q < d.P; ++q) gce[q] = 0;
            for (int64_t i = 0; i < d.DI; ++i)
              for (int64_t q = 0; q < d.P; ++q) gce[q] += u[i * d.P + q] * xs[i * d.P + q];
          }
        }
      }
    }
  });
  acc.finish();
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& K, const at::Tensor& c, const at::Tensor& src,
                   const at::Tensor& dst, int64_t num_nodes) {
  Dims d = check(x, K, c, src, dst, num_nodes);
  auto out = at::zeros({d.N, d.H, d.DO, d.P}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_aggregate_forward", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), K.data_ptr<scalar_t>(),
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
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_aggregate_backward", [&] {
    backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), K.data_ptr<scalar_t>(),
                              c.numel() ? c.data_ptr<scalar_t>() : nullptr, src.data_ptr<int64_t>(),
                              dst.data_ptr<int64_t>(), gx.defined() ? gx.data_ptr<scalar_t>() : nullptr,
                              gK.defined() ? gK.data_ptr<scalar_t>() : nullptr,
                              gc.defined() ? gc.data_ptr<scalar_t>() : nullptr, d);
  });
  return {gx, gK, gc};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused depthwise gather, kernel product and scatter-sum");
  m.def("backward", &backward, "its gradients with respect to x, K and c");
}
