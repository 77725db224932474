// Scalar pieces of linear attention that the CPU operator (ops/linear.hpp) and the CUDA kernels
// (cuda/linear_kernel.cuh) both compile, so the CPU tests exercise the code the GPU runs: the
// elementwise feature maps and the factor that turns an accumulated row into the output.
#pragma once

#include <cmath>

#include "attnkit/core/host_device.hpp"

namespace attnkit::kernels {

// exp for the accumulation types, callable from host and device code alike.
ATTNKIT_HOST_DEVICE inline float linear_exp(float x) { return expf(x); }
ATTNKIT_HOST_DEVICE inline double linear_exp(double x) { return exp(x); }

// elu(x) + 1 = (x > 0 ? x + 1 : exp(x)); NaN stays NaN (x <= 0 is false for NaN).
template <class Acc>
ATTNKIT_HOST_DEVICE inline Acc elu_plus_one(Acc x) {
  return x <= Acc(0) ? linear_exp(x) : x + Acc(1);
}

// max(x, 0); NaN stays NaN.
template <class Acc>
ATTNKIT_HOST_DEVICE inline Acc relu(Acc x) {
  return x < Acc(0) ? Acc(0) : x;
}

// The factor by which an accumulated numerator row is multiplied to give the output, from the
// row's accumulated denominator `den` and its stabilizer `stab` (FAVOR+ only: the features carried
// a factor exp(-stab), so eps is compared as eps * exp(-stab) = exp(log_eps - stab), and an
// unnormalized row is multiplied back by exp(stab)). A zero denominator (only reachable with
// eps = 0) gives 0.
template <class Acc>
ATTNKIT_HOST_DEVICE inline Acc linear_output_factor(bool normalize, bool favor, Acc eps, Acc log_eps, Acc den,
                                                    Acc stab) {
  if (normalize) {
    Acc e = eps;
    if (favor) e = eps > Acc(0) ? linear_exp(log_eps - stab) : Acc(0);
    const Acc d = den + e;
    return d == Acc(0) ? Acc(0) : Acc(1) / d;
  }
  return favor ? linear_exp(stab) : Acc(1);
}

}  // namespace attnkit::kernels
