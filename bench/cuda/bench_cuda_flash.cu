// attnkit::cuda::flash_attention on the CPU benches' shapes (bench_flash): prefill B1 H8
// N in {512..8k}, D in {64, 128}, causal and not, bf16 and f32; decode B1 Hq32 Hkv8 D128
// Nk in {4k, 32k, 128k}, bf16 and f32 (the GPU runs f16 like bf16). Timed with CUDA events around
// each call (manual time), after a warm-up call.
//
// attnkit::cuda::block_sparse_attention (the same flash kernels, compiled once here) on
// bench_block_sparse's shapes: B1 D128 non-causal, 128 x 128 mask blocks with exactly
// round(density * k_blocks) random active key blocks per query-block row, N in {4k, 16k, 32k} (H8;
// H4 at 32k), density 10/25/50 %, bf16, next to dense flash_attention on the same shapes in the same run
// (cuda_flash_dense/...: compare times for the speed-up). A block-sparse call includes expanding the
// mask on the host and its upload.
//
// Counters: TFLOPs (4 * Nq * Nk * D per head, halved for causal with Nq == Nk, as DESIGN.md counts;
// block-sparse: 4 * D per computed score, the rows x keys of the active tiles) and pct_peak against
// the GPU's dense peak for the input type; decode also GBs (K and V read once) and pct_bw. Peaks
// come from the device's attributes (see gpu_peaks in cuda_bench_common.cuh; the per-SM rates are
// the published ones for each architecture, so the fractions are approximate for parts with other
// clocks or fused-off units). Without a GPU the executable prints that and exits 0.
#include <attnkit/cuda/flash.cuh>  // first: includes the core headers the way nvcc wants them
#include <attnkit/cuda/block_sparse.cuh>

#include <algorithm>
#include <functional>
#include <numeric>

#include "cuda_bench_common.cuh"

using namespace attnkit;
using namespace attnkit::bench_cuda;

namespace {

// Times flash_attention on B x Nq x Hq x D queries against Nk keys of Hkv heads, BSHD, f32 output.
template <class T>
void run(benchmark::State& state, index_t Nq, index_t Nk, index_t Hq, index_t Hkv, index_t D, bool causal,
         bool decode) {
  const index_t B = 1;
  device_array<T> q(std::size_t(B * Nq * Hq * D), 1), k(std::size_t(B * Nk * Hkv * D), 2),
      v(std::size_t(B * Nk * Hkv * D), 3);
  device_array<float> out(std::size_t(B * Nq * Hq * D), 4);
  attention_params p;
  p.causal = causal;
  auto call = [&] {
    cuda::flash_attention(bshd<const T>(q.ptr, B, Nq, Hq, D), bshd<const T>(k.ptr, B, Nk, Hkv, D),
                          bshd<const T>(v.ptr, B, Nk, Hkv, D), bshd(out.ptr, B, Nq, Hq, D), p);
  };
  const double seconds = time_calls(state, call);
  const double iters = double(state.iterations());
  const double flops = 4.0 * double(B * Hq * Nq * Nk * D) / (causal && Nq == Nk ? 2.0 : 1.0);
  const double tflops = flops * iters / seconds / 1e12;
  const bool tensor = !std::is_same_v<T, float>;
  state.counters["TFLOPs"] = tflops;
  state.counters["pct_peak"] = 100.0 * tflops / (tensor ? peaks().tensor_16bit_tflops : peaks().fp32_tflops);
  if (decode) {
    const double bytes = 2.0 * double(B * Hkv * Nk * D) * sizeof(T);
    const double gbs = bytes * iters / seconds / 1e9;
    state.counters["GBs"] = gbs;
    state.counters["pct_bw"] = 100.0 * gbs / peaks().dram_gbs;
  }
}

// ---- block-sparse (bench_block_sparse's shapes) ----

constexpr index_t bs_D = 128, block = 128;

index_t bs_heads(index_t N) { return N >= 32768 ? 4 : 8; }

block_mask random_mask(index_t N, index_t H, double density, std::uint64_t seed) {
  const index_t nb = (N + block - 1) / block;
  const index_t per_row = std::max<index_t>(1, index_t(std::llround(density * double(nb))));
  std::vector<std::uint8_t> grid(std::size_t(H * nb * nb), 0);
  std::mt19937_64 g(seed);
  std::vector<index_t> idx(static_cast<std::size_t>(nb));
  for (index_t r = 0; r < H * nb; ++r) {
    std::iota(idx.begin(), idx.end(), index_t(0));
    std::shuffle(idx.begin(), idx.end(), g);
    for (index_t i = 0; i < per_row; ++i) grid[std::size_t(r * nb + idx[std::size_t(i)])] = 1;
  }
  return block_mask::from_dense(
      block, block, tensor_view<const std::uint8_t, 4>(grid.data(), {1, H, nb, nb}, {H * nb * nb, nb * nb, nb, 1}));
}

double computed_scores(const block_mask& m, index_t N) {
  double n = 0;
  for (index_t h = 0; h < m.heads(); ++h)
    for (index_t qb = 0; qb < m.q_blocks(); ++qb) {
      const index_t rows = std::min(N, (qb + 1) * block) - qb * block;
      for (const auto& r : m.active(0, h, qb)) n += double(rows) * double(std::min(N, r.end * block) - r.begin * block);
    }
  return n;
}

// density_pct < 0: dense flash_attention on the same shape.
template <class T>
void run_block_sparse(benchmark::State& state, index_t N, int density_pct) {
  const index_t H = bs_heads(N), D = bs_D;
  const auto n = std::size_t(N * H * D);
  device_array<T> q(n, 1), k(n, 2), v(n, 3);
  device_array<float> out(n, 4);
  const auto view = [&](const device_array<T>& x) { return bshd<const T>(x.ptr, 1, N, H, D); };
  double scores = double(H) * double(N) * double(N);
  std::function<void()> call;
  block_mask mask;
  if (density_pct < 0) {
    call = [&] { cuda::flash_attention(view(q), view(k), view(v), bshd(out.ptr, 1, N, H, D)); };
  } else {
    mask = random_mask(N, H, density_pct / 100.0, 7);
    scores = computed_scores(mask, N);
    state.counters["density"] = mask.density();
    call = [&] { cuda::block_sparse_attention(view(q), view(k), view(v), bshd(out.ptr, 1, N, H, D), mask); };
  }
  const double seconds = time_calls(state, call);
  const double tflops = 4.0 * double(D) * scores * double(state.iterations()) / seconds / 1e12;
  state.counters["TFLOPs"] = tflops;
  state.counters["pct_peak"] =
      100.0 * tflops / (std::is_same_v<T, float> ? peaks().fp32_tflops : peaks().tensor_16bit_tflops);
}

template <class T>
void register_all(const char* type) {
  for (index_t D : {64, 128})
    for (bool causal : {false, true})
      for (index_t N : {512, 1024, 2048, 4096, 8192}) {
        const std::string name = std::string("cuda_flash_prefill/") + type + "/D" + std::to_string(D) +
                                 (causal ? "/causal" : "/full") + "/N" + std::to_string(N);
        benchmark::RegisterBenchmark(name.c_str(),
                                     [=](benchmark::State& s) { run<T>(s, N, N, 8, 8, D, causal, false); })
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
  for (index_t Nk : {4096, 32768, 131072}) {
    const std::string name =
        std::string("cuda_flash_decode/") + type + "/Hq32/Hkv8/D128/Nk" + std::to_string(Nk);
    benchmark::RegisterBenchmark(name.c_str(),
                                 [=](benchmark::State& s) { run<T>(s, 1, Nk, 32, 8, 128, true, true); })
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
  // Block-sparse for bf16 only: its Sparse kernels are the extra compile time of this file.
  if constexpr (std::is_same_v<T, bf16>)
    for (index_t N : {4096, 16384, 32768})
      for (int density : {-1, 10, 25, 50}) {
        const std::string name = std::string(density < 0 ? "cuda_flash_dense/" : "cuda_block_sparse/") + type + "/N" +
                                 std::to_string(N) + (density < 0 ? "" : "/density" + std::to_string(density));
        benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { run_block_sparse<T>(s, N, density); })
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
}

}  // namespace

int main(int argc, char** argv) {
  return run_main(argc, argv, [] {
    register_all<bf16>("bf16");
    register_all<float>("f32");
  });
}
