// HQQ's per-group solver, written once over a lane type `Ops` (hqq_ops.hpp).
//
// This file has no include guard on purpose: hqq_ops.hpp includes it once per ISA,
// inside that ISA's namespace and target region, with `Ops` already declared there.
// Templates inherit the target attributes of the region they are defined in, so each
// inclusion compiles the same text for one instruction set (GCC does not pass target
// attributes down to a generic template, and a macro would hide the code). It includes
// nothing itself.
//
// A batch is Ops::lanes groups of equal length n, interleaved: w[i * lanes + l] is
// element i of the group in lane l. Every lane runs the same operations in the same
// order in every variant, so scalar, AVX2 and AVX-512 results are bit-identical.

// a^y for a >= 0 and y in [-1, 0]: exp2(y * log2(a)) with the polynomials of hqq_ops.hpp.
// Relative error below 1e-6 where |y log2 a| <= 16 (hqq_test states and checks it).
// a = 0 is taken as the smallest normal float: the shrink below is 0 for it either way.
template <class Ops>
[[gnu::always_inline]] inline typename Ops::V power(typename Ops::V a, typename Ops::V y) {
  using V = typename Ops::V;
  if constexpr (Ops::kExactPow) {
    return Ops::pow(a, y);
  } else {
    V exponent;
    const V mantissa = Ops::split_exponent(Ops::max(a, Ops::set1(kSmallestNormal)), exponent);
    const V f = Ops::sub(mantissa, Ops::set1(1.0f));
    V p = Ops::set1(kLog2Poly[kLog2Degree]);
    for (int k = kLog2Degree - 1; k >= 0; --k) p = Ops::fma(p, f, Ops::set1(kLog2Poly[k]));
    // y*log2(a) = y*e + y*f*P(f): one rounding for the large integral part.
    V v = Ops::fma(y, exponent, Ops::mul(y, Ops::mul(f, p)));
    v = Ops::min(Ops::max(v, Ops::set1(-126.0f)), Ops::set1(126.0f));
    const V k = Ops::round(v);
    const V r = Ops::sub(v, k);  // exact, |r| <= 1/2
    V q = Ops::set1(kExp2Poly[kExp2Degree]);
    for (int j = kExp2Degree - 1; j >= 0; --j) q = Ops::fma(q, r, Ops::set1(kExp2Poly[j]));
    return Ops::mul(q, Ops::exp2_int(k));
  }
}

// The lp shrinkage (proximal operator of |x|^p / beta), applied to the residual e:
//   shrink(e) = sign(e) * max(|e| - |e|^(p-1) / beta, 0),
// which is 0 exactly where |e| <= tau = (1/beta)^(1/(2-p)). Returns w - shrink(e), the
// term the zero update needs; lanes at or below tau keep w untouched, and a batch with
// no lane above tau (the usual case for LLM weights) skips the power entirely.
template <class Ops>
[[gnu::always_inline]] inline typename Ops::V minus_shrink(typename Ops::V w, typename Ops::V e,
                                                          typename Ops::V inv_beta, typename Ops::V tau,
                                                          typename Ops::V p_minus_1) {
  const typename Ops::V a = Ops::abs(e);
  const auto outside = Ops::lt(tau, a);
  if (!Ops::any(outside)) return w;
  const typename Ops::V kept = Ops::max(Ops::fnma(inv_beta, power<Ops>(a, p_minus_1), a), Ops::set1(0));
  return Ops::sub(w, Ops::select(outside, Ops::copysign(kept, e), Ops::set1(0)));
}

// q = clamp(round(w * s + z), 0, max_code), s the inverse scale.
template <class Ops>
[[gnu::always_inline]] inline typename Ops::V encode_lane(typename Ops::V w, typename Ops::V s, typename Ops::V z,
                                                         typename Ops::V top) {
  return Ops::min(Ops::max(Ops::round(Ops::fma(w, s, z)), Ops::set1(0)), top);
}

// HQQ's legacy solver, `steps` proximal steps on the zero with the inverse scale fixed:
//   W_q = encode(W), W_r = (W_q - z) * scale, W_e = shrink(W - W_r),
//   z <- mean(W_q - (W - W_e) s).
// HQQ divides by s for W_r; multiplying by the stored scale = 1/s differs by an ulp at
// most, decodes exactly as the stored matrix does, and avoids a 16-cycle division per
// vector. l1 (when given) receives sum |W - W_r| per lane for each step, before its
// update: [steps][lanes]. zero holds the start zeros and receives those after the last step.
template <class Ops, class S>
void reference_steps(const S* w, Index n, const S* inverse_scale, const S* scale, S* zero, int steps,
                     const S* inv_beta, const S* tau, S p_minus_1, S max_code, S* l1) {
  using V = typename Ops::V;
  constexpr int L = Ops::lanes;
  const V s = Ops::load(inverse_scale), stored_scale = Ops::load(scale), top = Ops::set1(max_code);
  const V y = Ops::set1(p_minus_1), count = Ops::set1(static_cast<S>(n));
  V z = Ops::load(zero);
  for (int step = 0; step < steps; ++step) {
    const V c = Ops::set1(inv_beta[step]), t = Ops::set1(tau[step]);
    V error = Ops::set1(0), sum = Ops::set1(0);
    for (Index i = 0; i < n; ++i) {
      const V wi = Ops::load(w + i * L);
      const V q = encode_lane<Ops>(wi, s, z, top);
      const V e = Ops::fnma(Ops::sub(q, z), stored_scale, wi);
      error = Ops::add(error, Ops::abs(e));
      sum = Ops::add(sum, Ops::fnma(minus_shrink<Ops>(wi, e, c, t, y), s, q));
    }
    if (l1 != nullptr) Ops::store(l1 + step * L, error);
    z = Ops::div(sum, count);  // the mean over the group
  }
  Ops::store(zero, z);
}

// Our solver for one scale: the same proximal steps, but each lane keeps the zero with
// the lowest squared error sum (w - (q - z) * scale)^2, scale = 1/s as stored, and stops
// after `patience` steps without improvement (when early_stop). The last update is
// evaluated too, so the kept error never rises with more steps. zero: start -> best;
// best_error: the kept error per lane.
template <class Ops, class S>
void improved_steps(const S* w, Index n, const S* inverse_scale, const S* scale, S* zero, S* best_error,
                    int steps, const S* inv_beta, const S* tau, S p_minus_1, S max_code, int patience,
                    bool early_stop) {
  using V = typename Ops::V;
  constexpr int L = Ops::lanes;
  const V s = Ops::load(inverse_scale), stored_scale = Ops::load(scale), top = Ops::set1(max_code);
  const V y = Ops::set1(p_minus_1), count = Ops::set1(static_cast<S>(n));
  const V one = Ops::set1(1), limit = Ops::set1(static_cast<S>(patience));
  V z = Ops::load(zero), best_z = z, best = Ops::set1(kInfinity<S>), stalled = Ops::set1(0);
  auto active = Ops::lt(Ops::set1(0), one);  // all lanes
  for (int step = 0;; ++step) {
    const bool update = step < steps;
    const V c = Ops::set1(update ? inv_beta[step] : S(0));
    const V t = Ops::set1(update ? tau[step] : kInfinity<S>);
    V error = Ops::set1(0), sum = Ops::set1(0);
    for (Index i = 0; i < n; ++i) {
      const V wi = Ops::load(w + i * L);
      const V q = encode_lane<Ops>(wi, s, z, top);
      const V e = Ops::fnma(Ops::sub(q, z), stored_scale, wi);
      error = Ops::fma(e, e, error);
      sum = Ops::add(sum, Ops::fnma(minus_shrink<Ops>(wi, e, c, t, y), s, q));
    }
    const auto improved = Ops::lt(error, best);
    best_z = Ops::select(improved, z, best_z);
    best = Ops::select(improved, error, best);
    if (!update) break;
    if (early_stop) {
      stalled = Ops::select(improved, Ops::set1(0), Ops::add(stalled, one));
      active = Ops::lt(stalled, limit);
      if (!Ops::any(active)) break;
    }
    z = Ops::select(active, Ops::div(sum, count), z);
  }
  Ops::store(zero, best_z);
  Ops::store(best_error, best);
}

// Codes (as values 0..max_code) of a batch: codes[i * lanes + l].
template <class Ops, class S>
void encode_steps(const S* w, Index n, const S* inverse_scale, const S* zero, S max_code, S* codes) {
  using V = typename Ops::V;
  constexpr int L = Ops::lanes;
  const V s = Ops::load(inverse_scale), z = Ops::load(zero), top = Ops::set1(max_code);
  for (Index i = 0; i < n; ++i) Ops::store(codes + i * L, encode_lane<Ops>(Ops::load(w + i * L), s, z, top));
}

// Per-lane minimum and maximum of a batch (n >= 1).
template <class Ops, class S>
void lane_range(const S* w, Index n, S* lo, S* hi) {
  using V = typename Ops::V;
  constexpr int L = Ops::lanes;
  V low = Ops::load(w), high = low;
  for (Index i = 1; i < n; ++i) {
    const V wi = Ops::load(w + i * L);
    low = Ops::min(low, wi);
    high = Ops::max(high, wi);
  }
  Ops::store(lo, low);
  Ops::store(hi, high);
}
