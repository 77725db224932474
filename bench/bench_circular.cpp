// circular_attention (CAT) over long sequences, and the batched real FFT behind it against FFTW.
//
// Counters (bench::run_timed):
//   GFLOPs: FFT FLOPs by the usual convention, 2.5 * M * log2(M) per real transform of length M;
//           circular_attention does one forward and one inverse transform per head and channel at
//           its transform length M (N for non-causal N = 2^a 3^b 5^c, else fft_good_size(2N - 1)),
//           so flops = B * H * D * 2 * 2.5 * M * log2(M) (the filter transforms, one per 16 heads,
//           and the pointwise products are not counted). The FFT benches count D * 2.5 * N * log2(N).
//   GBs:    bytes of v read plus out written plus logits read, 4 * B * N * H * (2 * D + 1).
// Names: circular/N:<N>/D:<D>/threads:<t> (H = 8, B = 1, float, non-causal), circular_causal/...,
// circular_renorm/..., fft_rfft/N:<N>/D:<D>/threads:1 (kernels::rfft), and with FFTW
// (ATTNKIT_BENCH_HAVE_FFTW) fftw_r2c/... with the same batch layout (x[m * D + c], fftwf_plan_many_dft_r2c,
// istride = ostride = D, idist = odist = 1, FFTW_MEASURE) and fftw_r2c_contiguous/... with each signal
// contiguous (istride = 1, idist = N: FFTW's preferred layout, for reference).
#include "common.hpp"

#include <cmath>
#include <complex>
#include <cstdint>
#include <memory>

#if defined(ATTNKIT_BENCH_HAVE_FFTW)
#include <fftw3.h>
#endif

using namespace attnkit;

namespace {

constexpr index_t kB = 1, kH = 8;

// Cheap deterministic fill in [-1, 1) (the large problems hold billions of bytes).
void fill(bench::buffer<float>& x, std::uint64_t seed) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& e : x) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    e = static_cast<float>(static_cast<std::int64_t>(s >> 40) - (1ll << 23)) / float(1 << 23);
  }
}

// The most recent problem, kept while consecutive benchmarks (thread counts, repetitions) share it.
struct problem {
  index_t N = 0, D = 0;
  bench::buffer<float> logits, v, out;
};

problem& get_problem(index_t N, index_t D) {
  static std::unique_ptr<problem> p;
  if (!p || p->N != N || p->D != D) {
    p.reset();
    p = std::make_unique<problem>();
    p->N = N;
    p->D = D;
    p->logits.resize(static_cast<std::size_t>(kB * kH * N));
    p->v.resize(static_cast<std::size_t>(kB * N * kH * D));
    p->out.assign(p->v.size(), 0.f);
    fill(p->logits, 1);
    for (auto& x : p->logits) x *= 3.f;
    fill(p->v, 2);
  }
  return *p;
}

index_t transform_length(index_t N, bool causal) {
  return !causal && kernels::fft_is_good_size(N) ? N : kernels::fft_good_size(2 * N - 1);
}

void run_circular(benchmark::State& state, circular_params params) {
  const index_t N = state.range(0), D = state.range(1);
  const int threads = int(state.range(2));
  problem& p = get_problem(N, D);
  const double M = double(transform_length(N, params.causal));
  const double flops = double(kB * kH * D) * 2 * 2.5 * M * std::log2(M);
  const double bytes = 4.0 * double(kB * N * kH) * double(2 * D + 1);
  bench::run_timed(state, threads, flops, bytes, [&] {
    circular_attention(bhs(p.logits.data(), kB, kH, N), bshd(p.v.data(), kB, N, kH, D),
                       bshd(p.out.data(), kB, N, kH, D), params);
  });
}

}  // namespace

static void circular(benchmark::State& state) { run_circular(state, {}); }
static void circular_causal(benchmark::State& state) { run_circular(state, {true, false}); }
static void circular_renorm(benchmark::State& state) { run_circular(state, {true, true}); }

BENCHMARK(circular)
    ->ArgNames({"N", "D", "threads"})
    ->ArgsProduct({{1024, 4096, 8192, 16384, 65536, 262144}, {64, 128}, {1, 2}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(circular_causal)
    ->ArgNames({"N", "D", "threads"})
    ->ArgsProduct({{4096, 16384, 65536}, {128}, {1, 2}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(circular_renorm)
    ->ArgNames({"N", "D", "threads"})
    ->ArgsProduct({{4096, 16384, 65536}, {128}, {1, 2}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

// ---- the batched real FFT -------------------------------------------------------------------------

namespace {
double rfft_flops(index_t N, index_t D) { return double(D) * 2.5 * double(N) * std::log2(double(N)); }
}  // namespace

static void fft_rfft(benchmark::State& state) {
  const index_t N = state.range(0), D = state.range(1);
  bench::buffer<float> x(static_cast<std::size_t>(N * D));
  fill(x, 3);
  bench::buffer<std::complex<float>> X(static_cast<std::size_t>((N / 2 + 1) * D));
  const auto plan = kernels::get_fft_plan(N);
  bench::run_timed(state, 1, rfft_flops(N, D), 0, [&] { kernels::rfft(*plan, x.data(), D, D, X.data(), D); });
}
BENCHMARK(fft_rfft)
    ->ArgNames({"N", "D", "threads"})
    ->ArgsProduct({{1024, 4096, 16384}, {128}, {1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

#if defined(ATTNKIT_BENCH_HAVE_FFTW)
namespace {
void run_fftw(benchmark::State& state, bool contiguous) {
  const index_t N = state.range(0), D = state.range(1);
  int n = static_cast<int>(N);
  float* in = fftwf_alloc_real(static_cast<std::size_t>(N * D));
  fftwf_complex* out = fftwf_alloc_complex(static_cast<std::size_t>((N / 2 + 1) * D));
  // Plan first (FFTW_MEASURE overwrites the arrays), then fill.
  const int D_ = static_cast<int>(D), half = n / 2 + 1;
  fftwf_plan plan = contiguous ? fftwf_plan_many_dft_r2c(1, &n, D_, in, nullptr, 1, n, out, nullptr, 1, half, FFTW_MEASURE)
                               : fftwf_plan_many_dft_r2c(1, &n, D_, in, nullptr, D_, 1, out, nullptr, D_, 1, FFTW_MEASURE);
  bench::buffer<float> x(static_cast<std::size_t>(N * D));
  fill(x, 3);
  std::copy(x.begin(), x.end(), in);
  bench::run_timed(state, 1, rfft_flops(N, D), 0, [&] { fftwf_execute(plan); });
  fftwf_destroy_plan(plan);
  fftwf_free(in);
  fftwf_free(out);
}
}  // namespace

static void fftw_r2c(benchmark::State& state) { run_fftw(state, false); }
static void fftw_r2c_contiguous(benchmark::State& state) { run_fftw(state, true); }
BENCHMARK(fftw_r2c)
    ->ArgNames({"N", "D", "threads"})
    ->ArgsProduct({{1024, 4096, 16384}, {128}, {1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(fftw_r2c_contiguous)
    ->ArgNames({"N", "D", "threads"})
    ->ArgsProduct({{1024, 4096, 16384}, {128}, {1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
#endif
