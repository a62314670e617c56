// Pointwise parts of the network as single autograd nodes, for constant parameters (molkern.nn.constants: an
// energy-and-forces call differentiates with respect to positions only).
//
// For one small molecule each PyTorch operation costs ~2-5 us (dispatch, allocation, autograd node), called from
// Python or from C++ alike, far more than its arithmetic: the edge basis (length, cutoff envelope, Bessel radial
// basis, harmonics) took ~35 operations forward and backward, a gated nonlinearity ~20. Here each is one autograd
// node. Two forms of each:
// - plain loops over the rows for the forward and the first derivatives;
// - ATen operations for the backward when gradient mode is on (create_graph): it recomputes what it needs from the
//   saved inputs with differentiable operations, so second derivatives (a force Hessian) are exact too.
// Tests compare both with the modules. The gate's loops take one exp per gate and row, slower than ATen's
// vectorised exp for many rows: molkern.nn.mlp.Gate calls it for small inputs only.
//
// The parameters (frequencies, coefficients) are constants: no gradient flows to them.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace molkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kGrain = 512;  // rows per thread at least

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ------------------------------------------------------------------------------------------------ edge basis

// The monomials x^a y^b z^c of vec (E, 3) as rows (M, E): columns (3M,) picks, per monomial and coordinate, the row
// of the power table (row 3k + i holds vec_i^k) (molkern.nn.harmonics).
at::Tensor monomials(const at::Tensor& vec, int64_t lmax, const at::Tensor& columns) {
  const int64_t E = vec.size(0);
  at::Tensor powers = vec.t().unsqueeze(0);
  if (lmax > 1) powers = powers.expand({lmax, 3, E}).cumprod(0);  // vec_i^k, k = 1..lmax
  powers = at::constant_pad_nd(powers, {0, 0, 0, 0, 1, 0}, 1.0).view({3 * (lmax + 1), E});  // k = 0..lmax
  return powers.index_select(0, columns).view({columns.size(0) / 3, 3, E}).prod(1);
}

// The envelope u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2) for x = r / cutoff < 1, else 0
// (molkern.nn.radial.PolynomialCutoff), and the Bessel basis sin(f_n y) / (f_n y), y = max(r, 1e-6 cutoff) / cutoff
// (BesselBasis), per edge in plain loops.
template <typename T>
struct BasisLoops {
  struct Entry {
    int32_t k, j;  // monomial, harmonic
    T value;
  };
  const T* freqs;
  int64_t NB, M, D, p;
  T cutoff;
  std::vector<Entry> by_harmonic, by_monomial;  // the nonzero coefficients (55 of 35 x 24 for l = 1..4), sorted
  std::vector<int32_t> parent, axis;  // monomial k = monomial parent[k] times coordinate axis[k] (k > 0)
  std::vector<int32_t> lower;         // (3, M): d monomial_k / d v_i = factor[i M + k] monomial_lower[i M + k]
  std::vector<T> factor;

  BasisLoops(const at::Tensor& freqs_, const at::Tensor& coeff, const at::Tensor& columns, const at::Tensor& lower_,
             const at::Tensor& factor_, int64_t p_, double cutoff_)
      : freqs(freqs_.data_ptr<T>()), NB(freqs_.numel()), M(coeff.size(0)), D(coeff.size(1)), p(p_),
        cutoff(static_cast<T>(cutoff_)), parent(M), axis(M), lower(3 * M), factor(3 * M) {
    const T* c = coeff.data_ptr<T>();
    for (int32_t k = 0; k < M; ++k)
      for (int32_t j = 0; j < D; ++j)
        if (c[k * D + j] != T(0)) by_monomial.push_back({k, j, c[k * D + j]});
    by_harmonic = by_monomial;
    std::stable_sort(by_harmonic.begin(), by_harmonic.end(), [](const Entry& a, const Entry& b) { return a.j < b.j; });
    const int64_t* col = columns.data_ptr<int64_t>();  // col[3k + i] = 3 (exponent of v_i in monomial k) + i
    const int64_t* low = lower_.data_ptr<int64_t>();
    const T* fac = factor_.data_ptr<T>();
    for (int64_t k = 0; k < M; ++k) {
      for (int64_t i = 0; i < 3; ++i) {
        lower[i * M + k] = static_cast<int32_t>(low[i * M + k]);
        factor[i * M + k] = fac[i * M + k];
      }
      int64_t i = 0;  // the first coordinate of nonzero exponent: monomial k = v_i monomial lower[i M + k]
      while (i < 3 && col[3 * k + i] < 3) ++i;
      parent[k] = i < 3 ? lower[i * M + k] : 0;
      axis[k] = static_cast<int32_t>(std::min<int64_t>(i, 2));
    }
    TORCH_CHECK(M > 0 && std::all_of(col, col + 3, [](int64_t c) { return c < 3; }), "monomial 0 must be 1");
    TORCH_CHECK(std::all_of(low, low + 3 * M, [&](int64_t k) { return k >= 0 && k < M; }),
                "edge_basis: lower must index the monomials");
  }

  void monomials(const T* v, T* mono) const {
    mono[0] = T(1);
    for (int64_t k = 1; k < M; ++k) mono[k] = mono[parent[k]] * v[axis[k]];
  }

  static T power(T x, int64_t n) {
    T out = T(1);
    for (int64_t k = 0; k < n; ++k) out *= x;
    return out;
  }

  // y (NB): the Bessel functions' arguments f_n max(r, 1e-6 cutoff) / cutoff (their sines and cosines are taken
  // for all edges at once by ATen's vectorised kernels)
  void arguments(T r, T* y) const {
    const T rc = std::max(r, T(1e-6) * cutoff) / cutoff;
    for (int64_t n = 0; n < NB; ++n) y[n] = freqs[n] * rc;
  }

  // length, envelope, harm (D) and the Bessel functions' arguments y (NB)
  void forward(const T* v, T& length, T& envelope, T* y, T* harm, T* mono) const {
    const T r = std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
    const T x = r / cutoff, q = static_cast<T>(p);
    length = r;
    envelope = x < T(1) ? T(1) + power(x, p) * (T(-0.5) * (q + 1) * (q + 2) +
                                                x * (q * (q + 2) - T(0.5) * q * (q + 1) * x))
                        : T(0);
    arguments(r, y);
    monomials(v, mono);
    std::fill(harm, harm + D, T(0));
    for (const Entry& c : by_harmonic) harm[c.j] += mono[c.k] * c.value;
  }

  // gv (3) = d/dv of g_len length + g_env envelope + g_rad . radial + g_harm . harm (null: zero gradient);
  // y, sin_y, cos_y (NB): the Bessel functions' arguments, their sines and cosines (with g_rad)
  void backward(const T* v, const T* g_len, const T* g_env, const T* g_rad, const T* g_harm, const T* y,
                const T* sin_y, const T* cos_y, T* gv, T* mono, T* d_mono) const {
    const T r = std::sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
    const T x = r / cutoff, q = static_cast<T>(p);
    T d_length = g_len ? *g_len : T(0);
    if (g_env && x < T(1))
      d_length += *g_env * power(x, p - 1) *
                  (T(-0.5) * (q + 1) * (q + 2) * q + x * (q * (q + 2) * (q + 1) - T(0.5) * q * (q + 1) * (q + 2) * x)) /
                  cutoff;
    if (g_rad && r >= T(1e-6) * cutoff)
      for (int64_t n = 0; n < NB; ++n) d_length += g_rad[n] * (cos_y[n] - sin_y[n] / y[n]) / y[n] * (freqs[n] / cutoff);
    const T scale = r > T(0) ? d_length / r : T(0);
    for (int64_t i = 0; i < 3; ++i) gv[i] = v[i] * scale;
    if (!g_harm) return;
    monomials(v, mono);
    std::fill(d_mono, d_mono + M, T(0));
    for (const Entry& c : by_monomial) d_mono[c.k] += c.value * g_harm[c.j];
    for (int64_t i = 0; i < 3; ++i) {
      T sum = T(0);
      for (int64_t k = 0; k < M; ++k) sum += d_mono[k] * factor[i * M + k] * mono[lower[i * M + k]];
      gv[i] += sum;
    }
  }
};

// (length (E,), envelope (E, 1), radial (E, num_basis), harmonics (E, D)) of vec (E, 3), harmonics = monomials^T
// coeff with coeff (M, D) any scales folded in; lower (3M,) and factor (3M, 1): per coordinate i and monomial k, the
// monomial with one power of coordinate i less and that power (d monomial_k / d vec_i = factor monomial_lower).
struct EdgeBasis : public torch::autograd::Function<EdgeBasis> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& vec, const at::Tensor& freqs,
                               const at::Tensor& coeff, const at::Tensor& columns, const at::Tensor& lower,
                               const at::Tensor& factor, double cutoff, int64_t p, int64_t lmax) {
    TORCH_CHECK(vec.dim() == 2 && vec.size(1) == 3, "edge_basis: vec must be (E, 3), got ", vec.sizes());
    TORCH_CHECK(coeff.dim() == 2 && columns.numel() == 3 * coeff.size(0) && lower.numel() == columns.numel(),
                "edge_basis: coeff (M, D), columns and lower (3M,) expected");
    TORCH_CHECK(vec.scalar_type() == freqs.scalar_type() && vec.scalar_type() == coeff.scalar_type() &&
                vec.scalar_type() == factor.scalar_type() && factor.numel() == columns.numel() &&
                freqs.is_contiguous() && coeff.is_contiguous() && factor.is_contiguous() &&
                columns.scalar_type() == at::kLong && lower.scalar_type() == at::kLong && columns.is_contiguous() &&
                lower.is_contiguous(), "edge_basis: contiguous freqs, coeff and factor (3M) in vec's dtype, "
                "contiguous int64 columns and lower expected");
    ctx->save_for_backward({vec});
    ctx->saved_data["constants"] = std::vector<at::Tensor>{freqs, coeff, columns, lower, factor};
    ctx->saved_data["cutoff"] = cutoff;
    ctx->saved_data["p"] = p;
    ctx->saved_data["lmax"] = lmax;
    const at::Tensor v = vec.contiguous();
    const int64_t E = v.size(0);
    at::Tensor length = at::empty({E}, v.options()), envelope = at::empty({E, 1}, v.options());
    at::Tensor radial = at::empty({E, freqs.numel()}, v.options()), harm = at::empty({E, coeff.size(1)}, v.options());
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "edge_basis", [&] {
      const BasisLoops<scalar_t> b(freqs, coeff, columns, lower, factor, p, cutoff);
      const scalar_t* vv = v.data_ptr<scalar_t>();
      scalar_t *r = length.data_ptr<scalar_t>(), *u = envelope.data_ptr<scalar_t>(), *y = radial.data_ptr<scalar_t>();
      scalar_t* h = harm.data_ptr<scalar_t>();
      at::parallel_for(0, E, kGrain, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> mono(b.M);
        for (int64_t e = begin; e < end; ++e) b.forward(vv + 3 * e, r[e], u[e], y + e * b.NB, h + e * b.D, mono.data());
      });
      const at::Tensor sines = at::sin(radial);  // ATen's vectorised sine, all edges at once
      const scalar_t* sin_y = sines.data_ptr<scalar_t>();
      at::parallel_for(0, radial.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) y[i] = sin_y[i] / y[i];
      });
    });
    return {length, envelope, radial, harm};
  }

  static at::Tensor backward_loops(const at::Tensor& vec, const variable_list& grads, const at::Tensor& freqs,
                                   const at::Tensor& coeff, const at::Tensor& columns, const at::Tensor& lower,
                                   const at::Tensor& factor, double cutoff, int64_t p) {
    const int64_t E = vec.size(0);
    at::Tensor v = vec.contiguous(), gv = at::empty({E, 3}, vec.options());
    std::vector<at::Tensor> g(4);
    for (int k = 0; k < 4; ++k)
      if (grads[k].defined()) g[k] = grads[k].contiguous();
    AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "edge_basis_backward", [&] {
      const BasisLoops<scalar_t> b(freqs, coeff, columns, lower, factor, p, cutoff);
      const scalar_t *gl = data_or_null<scalar_t>(g[0]), *ge = data_or_null<scalar_t>(g[1]);
      const scalar_t *gr = data_or_null<scalar_t>(g[2]), *gh = data_or_null<scalar_t>(g[3]);
      const scalar_t* vv = v.data_ptr<scalar_t>();
      scalar_t* out = gv.data_ptr<scalar_t>();
      at::Tensor y, sines, cosines;
      const scalar_t *y_, *sin_y = nullptr, *cos_y = nullptr;
      if (gr) {
        y = at::empty({E, b.NB}, vec.options());
        scalar_t* yy = y.data_ptr<scalar_t>();
        at::parallel_for(0, E, kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t e = begin; e < end; ++e) {
            const scalar_t* ve = vv + 3 * e;
            b.arguments(std::sqrt(ve[0] * ve[0] + ve[1] * ve[1] + ve[2] * ve[2]), yy + e * b.NB);
          }
        });
        sines = at::sin(y);
        cosines = at::cos(y);
        y_ = yy, sin_y = sines.data_ptr<scalar_t>(), cos_y = cosines.data_ptr<scalar_t>();
      }
      at::parallel_for(0, E, kGrain, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> mono(b.M), d_mono(b.M);
        for (int64_t e = begin; e < end; ++e) {
          const int64_t n = gr ? e * b.NB : 0;
          b.backward(vv + 3 * e, gl ? gl + e : nullptr, ge ? ge + e : nullptr, gr ? gr + n : nullptr,
                     gh ? gh + e * b.D : nullptr, gr ? y_ + n : nullptr, gr ? sin_y + n : nullptr,
                     gr ? cos_y + n : nullptr, out + 3 * e, mono.data(), d_mono.data());
        }
      });
    });
    return gv;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor vec = ctx->get_saved_variables()[0];
    const auto c = ctx->saved_data["constants"].toTensorVector();
    const at::Tensor &freqs = c[0], &coeff = c[1], &columns = c[2], &lower = c[3], &factor = c[4];
    const double cutoff = ctx->saved_data["cutoff"].toDouble();
    const int64_t power = ctx->saved_data["p"].toInt();
    variable_list out(9);
    if (!at::GradMode::is_enabled()) {
      out[0] = backward_loops(vec, grads, freqs, coeff, columns, lower, factor, cutoff, power);
      return out;
    }
    // create_graph: recompute from vec in ATen operations, recorded
    const double p = static_cast<double>(power);
    const at::Tensor length = at::linalg_vector_norm(vec, 2, {-1});
    at::Tensor d_length;  // dL/d length (E,)
    auto add = [](at::Tensor& sum, const at::Tensor& term) { sum = sum.defined() ? sum + term : term; };
    if (grads[0].defined()) add(d_length, grads[0]);
    if (grads[1].defined()) {  // du/dr = x^(p-1) (-(p+1)(p+2)/2 p + p(p+2)(p+1) x - p(p+1)/2 (p+2) x^2) / cutoff
      const at::Tensor x = length / cutoff;
      const at::Tensor du = x.pow(p - 1) * (-0.5 * (p + 1) * (p + 2) * p + p * (p + 2) * (p + 1) * x -
                                            0.5 * p * (p + 1) * (p + 2) * x * x) / cutoff;
      add(d_length, grads[1].squeeze(-1) * du * (x < 1.0));
    }
    if (grads[2].defined()) {  // d sin(y)/y / dy = (cos y - sin y / y) / y, y = f max(r, eps) / cutoff
      const at::Tensor y = freqs * (length.clamp_min(1e-6 * cutoff) / cutoff).unsqueeze(-1);
      const at::Tensor db = (at::cos(y) - at::sin(y) / y) / y * (freqs / cutoff);
      add(d_length, (grads[2] * db).sum(-1) * (length >= 1e-6 * cutoff));
    }
    at::Tensor d_vec;
    if (d_length.defined())  // d|v|/dv = v / |v|, 0 at v = 0 (as torch's norm)
      d_vec = vec * (d_length / length).masked_fill(length == 0, 0.0).unsqueeze(-1);
    if (grads[3].defined()) {
      const at::Tensor mono = monomials(vec, ctx->saved_data["lmax"].toInt(), columns);
      const at::Tensor d_mono = at::mm(coeff, grads[3].t());  // (M, E)
      const at::Tensor derivatives = mono.index_select(0, lower) * factor;  // (3M, E)
      add(d_vec, (derivatives.view({3, coeff.size(0), vec.size(0)}) * d_mono).sum(1).t());
    }
    out[0] = d_vec.defined() ? d_vec : at::zeros_like(vec);
    return out;
  }
};

std::vector<at::Tensor> edge_basis(const at::Tensor& vec, const at::Tensor& freqs, const at::Tensor& coeff,
                                   const at::Tensor& columns, const at::Tensor& lower, const at::Tensor& factor,
                                   double cutoff, int64_t p, int64_t lmax) {
  return EdgeBasis::apply(vec, freqs, coeff, columns, lower, factor, cutoff, p, lmax);
}

// ----------------------------------------------------------------------------------------------- activations

enum class Activation { Silu, Sigmoid, Tanh };

Activation activation(const std::string& name) {
  if (name == "silu") return Activation::Silu;
  if (name == "sigmoid") return Activation::Sigmoid;
  if (name == "tanh") return Activation::Tanh;
  TORCH_CHECK(false, "activation must be silu, sigmoid or tanh, got ", name);
}

at::Tensor activate(Activation f, const at::Tensor& x) {
  switch (f) {
    case Activation::Silu: return at::silu(x);
    case Activation::Sigmoid: return at::sigmoid(x);
    default: return at::tanh(x);
  }
}

// grad f'(x), differentiable (sigmoid_backward and tanh_backward have derivatives, silu_backward has none)
at::Tensor activate_backward(Activation f, const at::Tensor& grad, const at::Tensor& x) {
  switch (f) {
    case Activation::Silu: {
      const at::Tensor s = at::sigmoid(x);
      return grad * s * (1.0 + x * (1.0 - s));
    }
    case Activation::Sigmoid: return at::sigmoid_backward(grad, at::sigmoid(x));
    default: return at::tanh_backward(grad, at::tanh(x));
  }
}

// c f(x) and c f'(x) in plain arithmetic
template <typename T>
T activate_value(Activation f, T x) {
  switch (f) {
    case Activation::Silu: return x / (T(1) + std::exp(-x));
    case Activation::Sigmoid: return T(1) / (T(1) + std::exp(-x));
    default: return std::tanh(x);
  }
}

template <typename T>
T activate_slope(Activation f, T x) {
  switch (f) {
    case Activation::Silu: {
      const T s = T(1) / (T(1) + std::exp(-x));
      return s * (T(1) + x * (T(1) - s));
    }
    case Activation::Sigmoid: {
      const T s = T(1) / (T(1) + std::exp(-x));
      return s * (T(1) - s);
    }
    default: {
      const T t = std::tanh(x);
      return T(1) - t * t;
    }
  }
}

// ------------------------------------------------------------------------------------------------------ gate

// e3nn's gated nonlinearity (molkern.nn.mlp.Gate) on x (B, S + G + D) laid out as [scalars | gates | gated]:
// [cs fs(scalars) | gated * (cg fg(gates))[:, gate_of_column]], gate_of_column (D,) int64.
struct GateFunction : public torch::autograd::Function<GateFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& gate_of_column,
                            int64_t num_scalars, int64_t num_gates, const std::string& scalar_act, double scalar_c,
                            const std::string& gate_act, double gate_c) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == num_scalars + num_gates + gate_of_column.numel(),
                "gate: x must be (B, ", num_scalars + num_gates + gate_of_column.numel(), "), got ", x.sizes());
    TORCH_CHECK(gate_of_column.scalar_type() == at::kLong && gate_of_column.is_contiguous(),
                "gate: gate_of_column must be contiguous int64");
    ctx->save_for_backward({x});
    ctx->saved_data["gate_of_column"] = gate_of_column;
    ctx->saved_data["sizes"] = std::vector<int64_t>{num_scalars, num_gates};
    ctx->saved_data["scalar_act"] = scalar_act;
    ctx->saved_data["gate_act"] = gate_act;
    ctx->saved_data["constants"] = std::vector<double>{scalar_c, gate_c};
    return gate_loops(x.contiguous(), gate_of_column, num_scalars, num_gates, activation(scalar_act), scalar_c,
                      activation(gate_act), gate_c, {});
  }

  // Forward (grad undefined) or, given grad (B, S + D), the backward in plain loops, one row at a time.
  static at::Tensor gate_loops(const at::Tensor& x, const at::Tensor& gate_of_column, int64_t S, int64_t G,
                               Activation fs, double cs, Activation fg, double cg, const at::Tensor& grad) {
    const int64_t B = x.size(0), D = gate_of_column.numel(), W = x.size(1);
    const bool forward = !grad.defined();
    at::Tensor out = at::empty({B, forward ? S + D : W}, x.options());
    const at::Tensor g = forward ? grad : grad.contiguous();
    const int64_t* column_gate = gate_of_column.data_ptr<int64_t>();
    TORCH_CHECK(std::all_of(column_gate, column_gate + D, [&](int64_t k) { return k >= 0 && k < G; }),
                "gate: gate_of_column must index the ", G, " gates");
    const int64_t out_width = out.size(1);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gate", [&] {
      using T = scalar_t;
      const T* x_ = x.data_ptr<T>();
      const T* g_ = forward ? nullptr : g.data_ptr<T>();
      T* out_ = out.data_ptr<T>();
      at::parallel_for(0, B, kGrain / 8, [&](int64_t begin, int64_t end) {
        std::vector<T> factors(G), sums(G);
        for (int64_t b = begin; b < end; ++b) {
          const T* xb = x_ + b * W;
          T* ob = out_ + b * out_width;
          const T* gb = forward ? nullptr : g_ + b * (S + D);
          for (int64_t j = 0; j < S; ++j)
            ob[j] = forward ? T(cs) * activate_value(fs, xb[j]) : gb[j] * T(cs) * activate_slope(fs, xb[j]);
          for (int64_t k = 0; k < G; ++k) factors[k] = T(cg) * activate_value(fg, xb[S + k]);
          if (forward) {
            for (int64_t j = 0; j < D; ++j) ob[S + j] = xb[S + G + j] * factors[column_gate[j]];
            continue;
          }
          std::fill(sums.begin(), sums.end(), T(0));
          for (int64_t j = 0; j < D; ++j) {
            ob[S + G + j] = gb[S + j] * factors[column_gate[j]];
            sums[column_gate[j]] += gb[S + j] * xb[S + G + j];
          }
          for (int64_t k = 0; k < G; ++k) ob[S + k] = sums[k] * T(cg) * activate_slope(fg, xb[S + k]);
        }
      });
    });
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    const at::Tensor gate_of_column = ctx->saved_data["gate_of_column"].toTensor();
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    const auto constants = ctx->saved_data["constants"].toDoubleVector();
    const int64_t S = sizes[0], G = sizes[1], D = gate_of_column.numel();
    const Activation fs = activation(ctx->saved_data["scalar_act"].toStringRef()),
                     fg = activation(ctx->saved_data["gate_act"].toStringRef());
    const at::Tensor& grad = grads[0];
    variable_list out(8);
    if (!at::GradMode::is_enabled()) {
      out[0] = gate_loops(x.contiguous(), gate_of_column, S, G, fs, constants[0], fg, constants[1], grad);
      return out;
    }
    const at::Tensor d_scalars = activate_backward(fs, grad.narrow(1, 0, S), x.narrow(1, 0, S)) * constants[0];
    if (D == 0) {
      out[0] = G == 0 ? d_scalars : at::cat({d_scalars, at::zeros({x.size(0), G}, x.options())}, 1);
      return out;
    }
    const at::Tensor gates = x.narrow(1, S, G), gated = x.narrow(1, S + G, D), grad_gated = grad.narrow(1, S, D);
    const at::Tensor factors = (activate(fg, gates) * constants[1]).index_select(1, gate_of_column);  // (B, D)
    // each gate's sum over its columns as a matmul with the one-hot (D, G) matrix (index_add along dim 1 runs one
    // operation per index)
    const at::Tensor selection = at::one_hot(gate_of_column, G).to(x.scalar_type());
    const at::Tensor d_gate_values = at::mm(grad_gated * gated, selection);
    const at::Tensor d_gates = activate_backward(fg, d_gate_values, gates) * constants[1];
    out[0] = at::cat({d_scalars, d_gates, grad_gated * factors}, 1);
    return out;
  }
};

at::Tensor gate(const at::Tensor& x, const at::Tensor& gate_of_column, int64_t num_scalars, int64_t num_gates,
                const std::string& scalar_act, double scalar_c, const std::string& gate_act, double gate_c) {
  return GateFunction::apply(x, gate_of_column, num_scalars, num_gates, scalar_act, scalar_c, gate_act, gate_c);
}

}  // namespace

void register_constant_functions(pybind11::module& m) {
  m.def("edge_basis", &edge_basis, "length, envelope, Bessel basis and harmonics of the edge vectors (one node)");
  m.def("gate", &gate, "gated nonlinearity (one autograd node)");
}

}  // namespace molkern
