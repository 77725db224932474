// attnkit::cuda::block_sparse_attention on the CPU bench's shapes (bench_block_sparse): B1, D128,
// non-causal, 128 x 128 mask blocks with exactly round(density * k_blocks) random active key blocks
// per query-block row, N in {4k, 16k, 32k} (H8; H4 at 32k), density 10/25/50 %, bf16 and f32; dense
// cuda::flash_attention on the same shapes in the same run (compare times for the speed-up). Timed
// with CUDA events around each call (manual time; the call includes expanding the mask on the host
// and its upload).
//
// Counters: TFLOPs = 4 * D per computed score (rows x keys of the active tiles; dense: 4 * N^2 * D
// per head, as DESIGN.md counts) / time, and pct_peak against the GPU's dense peak for the input
// type.
#include <attnkit/cuda/block_sparse.cuh>  // first: includes the core headers the way nvcc wants them
#include <attnkit/cuda/flash.cuh>

#include <algorithm>
#include <numeric>

#include "cuda_bench_common.cuh"

using namespace attnkit;
using namespace attnkit::bench_cuda;

namespace {

constexpr index_t D = 128, block = 128;

index_t heads_for(index_t N) { return N >= 32768 ? 4 : 8; }

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

// density_pct < 0: dense flash_attention.
template <class T>
void run(benchmark::State& state, index_t N, int density_pct) {
  const index_t H = heads_for(N);
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
  for (index_t N : {4096, 16384, 32768})
    for (int density : {-1, 10, 25, 50}) {
      const std::string name = std::string(density < 0 ? "cuda_flash_dense/" : "cuda_block_sparse/") + type + "/N" +
                               std::to_string(N) + (density < 0 ? "" : "/density" + std::to_string(density));
      benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { run<T>(s, N, density); })
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
