// libFuzzer target: decodes shapes, strides, element types, parameters (valid or not) and values
// from the input bytes and calls the public entry points. Invalid input must end in attnkit::error;
// anything else (a crash, a sanitizer report, another exception, a hang) is a bug.
//   build: cmake -DCMAKE_CXX_COMPILER=clang++ -DATTNKIT_BUILD_FUZZ=ON ...; run: fuzz_attention -max_total_time=300 CORPUS
#include <attnkit/attnkit.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using attnkit::index_t;

struct reader {
  const std::uint8_t* p;
  std::size_t n;
  std::uint8_t byte() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  index_t below(index_t k) { return k <= 0 ? 0 : index_t(byte()) % k; }
  float value() {
    const std::uint8_t b = byte();
    if (b == 255) return std::numeric_limits<float>::quiet_NaN();
    if (b == 254) return std::numeric_limits<float>::infinity();
    if (b == 253) return -std::numeric_limits<float>::infinity();
    if (b == 252) return 1e4f;
    return (float(b) - 126.f) / 32.f;
  }
};

// A buffer and a view over it with fuzzed strides: natural, padded, or 0 (broadcast) per axis.
template <class T, std::size_t R>
struct fuzz_tensor {
  std::vector<T> buf;
  attnkit::tensor_view<T, R> view;
  fuzz_tensor(reader& r, std::array<index_t, R> ext, bool allow_broadcast) {
    std::array<index_t, R> st{};
    index_t run = 1;
    for (std::size_t a = R; a-- > 0;) {
      const index_t mode = r.below(4);
      st[a] = (allow_broadcast && mode == 3) ? 0 : run + (mode == 2 ? r.below(3) : 0);
      run = st[a] * std::max<index_t>(ext[a], 1) + 1;
    }
    index_t max_off = 0;
    bool empty = false;
    for (std::size_t a = 0; a < R; ++a) {
      if (ext[a] == 0) empty = true;
      max_off += std::max<index_t>(ext[a] - 1, 0) * st[a];
    }
    buf.resize(empty ? 1 : std::size_t(max_off + 1));
    for (auto& x : buf) x = T(r.value());
    view = attnkit::tensor_view<T, R>(buf.data(), ext, st);
  }
};

template <class T, class O>
void run_softmax(reader& r, int op) {
  const index_t B = r.below(3), Nq = r.below(70), Nk = r.below(160), Hkv = r.below(3), Hq = Hkv * (1 + r.below(3)) + (r.below(8) == 0);
  const index_t D = r.below(40), Dv = r.below(40);
  fuzz_tensor<T, 4> q(r, {B, Nq, Hq, D}, true), k(r, {B, Nk, Hkv, D}, true), v(r, {B, Nk, Hkv, Dv}, true);
  fuzz_tensor<O, 4> out(r, {B, Nq + (r.below(16) == 0), Hq, Dv}, r.below(8) == 0);
  fuzz_tensor<O, 3> lse(r, {B, Hq, Nq}, r.below(8) == 0);
  attnkit::attention_params p;
  p.causal = r.below(2);
  p.window_left = r.below(4) == 0 ? r.below(70) - 2 : -1;
  p.window_right = r.below(4) == 0 ? r.below(70) - 2 : -1;
  if (r.below(3) == 0) p.softcap = r.value();
  if (r.below(3) == 0) p.scale = r.value();
  std::vector<float> bias_buf;
  if (r.below(3) == 0) {
    const std::array<index_t, 4> be{r.below(2) ? B : 1, r.below(2) ? Hq : 1, r.below(2) ? Nq : 1, Nk + (r.below(16) == 0)};
    bias_buf.resize(std::size_t(std::max<index_t>(be[0] * be[1] * be[2] * be[3], 1)));
    for (auto& x : bias_buf) x = r.value();
    p.bias = attnkit::tensor_view<const float, 4>(bias_buf.data(), be, {be[1] * be[2] * be[3], be[2] * be[3], be[3], 1});
  }
  std::vector<float> slopes(std::size_t(std::max<index_t>(Hq, 1)));
  if (r.below(3) == 0) {
    for (auto& x : slopes) x = r.value();
    p.alibi_slopes = slopes.data();
  }
  std::vector<index_t> lens(std::size_t(std::max<index_t>(B, 1)));
  if (r.below(3) == 0) {
    for (auto& x : lens) x = r.below(Nk + 3) - 1;
    p.kv_lengths = lens.data();
  }
  try {
    if (op == 0) attnkit::reference_attention(q.view, k.view, v.view, out.view, p, lse.view);
    if (op == 1) attnkit::flash_attention(q.view, k.view, v.view, out.view, p, lse.view);
    if (op == 2) {
      fuzz_tensor<O, 4> ob(r, {B, Nq, Hq, Dv}, true);
      fuzz_tensor<O, 3> lb(r, {B, Hq, Nq}, true);
      attnkit::merge_attention_states(out.view, lse.view, ob.view, lb.view, out.view, lse.view);
    }
  } catch (const attnkit::error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  reader r{data, size};
  const int op = int(r.below(3));
  switch (r.below(4)) {
    case 0: run_softmax<float, float>(r, op); break;
    case 1: run_softmax<attnkit::bf16, float>(r, op); break;
    case 2: run_softmax<attnkit::f16, float>(r, op); break;
    default: run_softmax<double, double>(r, op); break;
  }
  return 0;
}
