// Test-only CPU emulation of the CUDA built-ins and sm_80 instructions that attnkit's kernels use,
// so that the kernels' index arithmetic (fragment layouts, tiles, tails, masks, split-KV, merges)
// runs and is checked against the reference on a machine without a GPU.
//
// Included by attnkit/cuda/mma.cuh in place of its inline PTX when ATTNKIT_CUDA_EMULATION names
// this file; the kernels are then compiled by the host C++ compiler. Every CUDA thread of a block is
// a fiber on the calling OS thread (a minimal x86-64 stack switch; ucontext elsewhere), scheduled
// cooperatively and deterministically: a fiber runs until it reaches a warp-collective operation (shuffle,
// ldmatrix, mma.sync,
// __syncwarp), __syncthreads or its end. When all 32 lanes of a warp have reached the same
// collective, one step computes every lane's result from the inputs the lanes deposited, exactly
// as the PTX ISA specifies them:
//  - mma.m16n8k16 .row.col f32 += bf16/f16 x bf16/f16, fragments per "Matrix Fragments for
//    mma.m16n8k16 with floating point type" (transcribed from the formulas there, independently of
//    the kernel's own shorthand);
//  - ldmatrix .m8n8 .x4 (.trans) .b16: lanes 8i..8i+7 address the rows of matrix i; lane l receives
//    row l/4, columns 2(l%4), 2(l%4)+1 of each matrix (of its transpose with .trans);
//  - cp.async 16 bytes: the copy is deferred until the issuing thread's cp.async.wait_all, the latest
//    moment the hardware may complete it, so reading a tile before waiting shows up as wrong data.
// Misuse aborts with a message: divergent collectives (lanes at different operations, or some
// lanes exited), deadlocks, unaligned ldmatrix/cp.async addresses, ldmatrix/cp.async outside the
// launch's dynamic shared memory. With AddressSanitizer (the test target enables it) the bytes of
// the shared-memory arena past the launch's size are poisoned, so any access beyond it is caught.
// Blocks run one after the other; shared memory is filled with 0xFF (NaN in every float format)
// before each block, so a read of shared memory that no thread wrote shows up as NaN.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define ATTNKIT_EMU_ASAN 1
#else
#define ATTNKIT_EMU_ASAN 0
#endif

#define __launch_bounds__(...)

// ---- fiber stack switching ----------------------------------------------------------------------------
// glibc's swapcontext makes a signal-mask system call per switch and AddressSanitizer intercepts it
// to clear the shadow of the whole stack, which made the emulation ~10x slower than needed; on
// x86-64 a switch is just the six callee-saved registers and the stack pointer (System V ABI; the
// kernels do not touch MXCSR or the x87 control word).
#if defined(__x86_64__)
extern "C" void attnkit_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .weak attnkit_emu_switch
  .type attnkit_emu_switch, @function
attnkit_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size attnkit_emu_switch, .-attnkit_emu_switch
)");
#endif

namespace attnkit_emu {
struct context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};
inline void switch_context(context& from, context& to) {
#if defined(__x86_64__)
  attnkit_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}
// Prepares `c` to start entry() on the given stack at the next switch_context into it. entry must
// never return.
inline void make_context(context& c, unsigned char* stack, std::size_t size, void (*entry)(),
                         context& /*link*/) {
#if defined(__x86_64__)
  auto top = reinterpret_cast<std::uintptr_t>(stack + size) & ~std::uintptr_t(15);
  auto* slot = reinterpret_cast<void**>(top);
  *--slot = nullptr;                              // entry's (never used) return address: rsp = 8 mod 16
  *--slot = reinterpret_cast<void*>(entry);       // popped by `ret`
  for (int r = 0; r < 6; ++r) *--slot = nullptr;  // rbp, rbx, r12..r15
  c.sp = slot;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#endif
}
}  // namespace attnkit_emu

// The CUDA thread coordinates of the fiber that is running.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace attnkit::cuda::detail {
// The dynamic shared memory every kernel declares as `extern __shared__ unsigned char smem_raw[]`.
inline constexpr std::size_t emulated_smem_capacity = 228 * 1024;
alignas(16) inline unsigned char smem_raw[emulated_smem_capacity];
}  // namespace attnkit::cuda::detail

namespace attnkit_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

enum class op : int { none, shfl, sync, ldmatrix, ldmatrix_trans, mma_bf16, mma_f16 };

struct lane_slot {
  op kind = op::none;
  std::uint64_t value = 0;  // shfl input bits
  int src = 0;              // shfl source lane
  const void* address = nullptr;
  std::uint32_t a[4]{}, b[2]{};
  float c[4]{};
  std::uint64_t out_value = 0;
  std::uint32_t out_regs[4]{};
  float out_d[4]{};
};

// A meeting point (one warp's collectives, or the block's __syncthreads): `live` members, `arrived`
// so far in the current round, `generation` counts completed rounds.
struct rendezvous {
  int live = 0, arrived = 0;
  std::uint64_t generation = 0;
};

struct warp_state {
  lane_slot lanes[32];
  rendezvous meet;
};

struct pending_copy {
  void* dst;
  const void* src;
};

struct fiber {
  context ctx;
  std::unique_ptr<unsigned char[]> stack;
  std::size_t stack_size = 0;
  unsigned tid = 0;
  bool done = false;
  const rendezvous* waiting = nullptr;  // blocked until waiting->generation != waiting_for
  std::uint64_t waiting_for = 0;
  std::vector<pending_copy> copies;  // cp.async issued, not yet waited for
  void* asan_fake_stack = nullptr;
};

struct block_state {
  std::vector<fiber> fibers;
  std::vector<warp_state> warps;
  rendezvous block_meet;
  const unsigned char* smem_begin = nullptr;
  const unsigned char* smem_end = nullptr;
  context scheduler;
  void* asan_scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  std::size_t scheduler_stack_size = 0;
};

inline block_state* g_block = nullptr;
inline fiber* g_fiber = nullptr;  // the running fiber
inline void (*g_entry)() = nullptr;

inline int lane() { return static_cast<int>(g_fiber->tid % 32); }
inline warp_state& warp() { return g_block->warps[g_fiber->tid / 32]; }
inline lane_slot& my_slot() { return warp().lanes[lane()]; }

// Back to the scheduler; returns when the scheduler resumes this fiber.
inline void yield() {
  fiber* self = g_fiber;
#if ATTNKIT_EMU_ASAN
  __sanitizer_start_switch_fiber(&self->asan_fake_stack, g_block->scheduler_stack_bottom,
                                 g_block->scheduler_stack_size);
#endif
  switch_context(self->ctx, g_block->scheduler);
#if ATTNKIT_EMU_ASAN
  __sanitizer_finish_switch_fiber(self->asan_fake_stack, nullptr, nullptr);
#endif
}

// Waits until the rendezvous completes its current round; `complete` runs once, in the last
// arriving fiber, before anyone proceeds.
template <class Complete>
void meet(rendezvous& r, Complete&& complete) {
  if (++r.arrived == r.live) {
    complete();
    r.arrived = 0;
    ++r.generation;
    return;
  }
  g_fiber->waiting = &r;
  g_fiber->waiting_for = r.generation;
  yield();
}

inline float bf16_bits_to_float(std::uint16_t h) {
  const std::uint32_t u = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float f16_bits_to_float(std::uint16_t h) { return __half2float(__ushort_as_half(h)); }

// Computes the results of a warp collective once all 32 lanes have deposited their inputs.
inline void complete(warp_state& w) {
  const op kind = w.lanes[0].kind;
  for (const lane_slot& s : w.lanes)
    if (s.kind != kind) fail("lanes of one warp reached different collective operations (divergence)");
  switch (kind) {
    case op::none:
    case op::sync:
      break;
    case op::shfl:
      for (auto& s : w.lanes) s.out_value = w.lanes[s.src & 31].value;
      break;
    case op::ldmatrix:
    case op::ldmatrix_trans: {
      // Matrix i has its 8 rows (8 b16 elements, 16 bytes each) at the addresses of lanes 8i..8i+7.
      auto elem = [&](int i, int row, int col) {
        const auto* p = static_cast<const std::uint16_t*>(w.lanes[8 * i + row].address);
        return p[col];
      };
      for (int l = 0; l < 32; ++l)
        for (int i = 0; i < 4; ++i) {
          std::uint16_t lo, hi;
          if (kind == op::ldmatrix) {
            lo = elem(i, l / 4, 2 * (l % 4));
            hi = elem(i, l / 4, 2 * (l % 4) + 1);
          } else {
            lo = elem(i, 2 * (l % 4), l / 4);
            hi = elem(i, 2 * (l % 4) + 1, l / 4);
          }
          w.lanes[l].out_regs[i] = std::uint32_t(lo) | (std::uint32_t(hi) << 16);
        }
      break;
    }
    case op::mma_bf16:
    case op::mma_f16: {
      auto to_float = [&](std::uint32_t reg, int half) {
        const auto h = static_cast<std::uint16_t>(half ? reg >> 16 : reg & 0xffffu);
        return kind == op::mma_bf16 ? bf16_bits_to_float(h) : f16_bits_to_float(h);
      };
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int groupID = l >> 2, tig = l % 4;  // threadID_in_group
        const lane_slot& s = w.lanes[l];
        for (int i = 0; i < 8; ++i) {  // a0..a7: register i/2, low half for even i
          const int row = (i < 2 || (4 <= i && i < 6)) ? groupID : groupID + 8;
          const int col = (i < 4) ? tig * 2 + (i & 1) : tig * 2 + (i & 1) + 8;
          A[row][col] = to_float(s.a[i / 2], i % 2);
        }
        for (int i = 0; i < 4; ++i) {  // b0..b3
          const int row = (i < 2) ? tig * 2 + (i & 1) : tig * 2 + (i & 1) + 8;
          B[row][groupID] = to_float(s.b[i / 2], i % 2);
        }
        for (int i = 0; i < 4; ++i) {  // c0..c3
          const int row = i < 2 ? groupID : groupID + 8;
          C[row][tig * 2 + (i & 1)] = s.c[i];
        }
      }
      for (int l = 0; l < 32; ++l) {
        const int groupID = l >> 2, tig = l % 4;
        for (int i = 0; i < 4; ++i) {
          const int row = i < 2 ? groupID : groupID + 8, col = tig * 2 + (i & 1);
          double acc = C[row][col];
          for (int kk = 0; kk < 16; ++kk) acc += double(A[row][kk]) * double(B[kk][col]);
          w.lanes[l].out_d[i] = static_cast<float>(acc);
        }
      }
      break;
    }
  }
}

inline void warp_collective(op kind) {
  warp_state& w = warp();
  if (w.meet.live != 32) fail("warp collective while some lanes of the warp have exited");
  my_slot().kind = kind;
  meet(w.meet, [&] { complete(w); });
}

template <class T>
T shuffle(T v, int src) {
  static_assert(sizeof(T) <= 8);
  lane_slot& s = my_slot();
  s.value = 0;
  std::memcpy(&s.value, &v, sizeof(T));
  s.src = src;
  warp_collective(op::shfl);
  T r;
  std::memcpy(&r, &my_slot().out_value, sizeof(T));
  return r;
}

inline void require_smem(const void* p, std::size_t bytes, const char* what) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < g_block->smem_begin || b + bytes > g_block->smem_end) fail(what);
}

[[noreturn]] inline void fiber_main() {
#if ATTNKIT_EMU_ASAN
  // Learn the scheduler's stack from the first switch into this fiber.
  __sanitizer_finish_switch_fiber(nullptr, &g_block->scheduler_stack_bottom, &g_block->scheduler_stack_size);
#endif
  g_entry();
  fiber* self = g_fiber;
  if (!self->copies.empty()) fail("thread exited with cp.async copies never waited for");
  self->done = true;
  // Leaving: the warp and the block have one member less; a round that only waited for this
  // fiber completes now.
  warp_state& w = warp();
  if (--w.meet.live > 0 && w.meet.arrived == w.meet.live)
    fail("lanes of a warp exited while others wait at a collective");
  rendezvous& b = g_block->block_meet;
  if (--b.live > 0 && b.arrived == b.live) {
    b.arrived = 0;
    ++b.generation;
  }
#if ATTNKIT_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, g_block->scheduler_stack_bottom, g_block->scheduler_stack_size);
#endif
  switch_context(self->ctx, g_block->scheduler);
  fail("a finished thread was resumed");
}

// Runs kernel(args...) for every block of `grid` with `block` threads and `smem_bytes` of dynamic
// shared memory; blocks run one after another, the threads of a block as fibers.
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem_bytes, Args&&... args) {
  using attnkit::cuda::detail::emulated_smem_capacity;
  using attnkit::cuda::detail::smem_raw;
  if (smem_bytes > emulated_smem_capacity) fail("dynamic shared memory larger than any GPU offers");
  if (block.y != 1 || block.z != 1 || block.x == 0) fail("only 1-D blocks are emulated");
  const unsigned threads = block.x;
  constexpr std::size_t stack_size = std::size_t(256) << 10;

  // The kernel call with its arguments, as the fibers' entry point.
  static thread_local std::function<void()> body;
  body = [&] { kernel(args...); };
  g_entry = [] { body(); };

  block_state bs;
  bs.fibers.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    bs.fibers[t].stack.reset(new unsigned char[stack_size]);  // not zero-filled
    bs.fibers[t].stack_size = stack_size;
    bs.fibers[t].tid = t;
  }
  g_block = &bs;
  blockDim = block;
  gridDim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
#if ATTNKIT_EMU_ASAN
        ASAN_UNPOISON_MEMORY_REGION(smem_raw, emulated_smem_capacity);
#endif
        std::memset(smem_raw, 0xff, emulated_smem_capacity);
#if ATTNKIT_EMU_ASAN
        ASAN_POISON_MEMORY_REGION(smem_raw + smem_bytes, emulated_smem_capacity - smem_bytes);
#endif
        bs.smem_begin = smem_raw;
        bs.smem_end = smem_raw + smem_bytes;
        bs.warps.assign((threads + 31) / 32, warp_state{});
        for (unsigned w = 0; w < bs.warps.size(); ++w)
          bs.warps[w].meet.live = static_cast<int>(std::min(32u, threads - 32 * w));
        bs.block_meet = rendezvous{static_cast<int>(threads), 0, 0};
        blockIdx = make_uint3(bx, by, bz);
        for (fiber& f : bs.fibers) {
          f.done = false;
          f.waiting = nullptr;
          f.copies.clear();
#if ATTNKIT_EMU_ASAN
          ASAN_UNPOISON_MEMORY_REGION(f.stack.get(), f.stack_size);  // stale redzones of the last block
#endif
          make_context(f.ctx, f.stack.get(), f.stack_size, fiber_main, bs.scheduler);
        }
        // Round-robin over the fibers that can make progress until all are done.
        for (unsigned finished = 0; finished < threads;) {
          bool progressed = false;
          for (fiber& f : bs.fibers) {
            if (f.done || (f.waiting != nullptr && f.waiting->generation == f.waiting_for)) continue;
            f.waiting = nullptr;
            g_fiber = &f;
            threadIdx = make_uint3(f.tid, 0, 0);
#if ATTNKIT_EMU_ASAN
            __sanitizer_start_switch_fiber(&bs.asan_scheduler_fake_stack, f.stack.get(), f.stack_size);
#endif
            switch_context(bs.scheduler, f.ctx);
#if ATTNKIT_EMU_ASAN
            __sanitizer_finish_switch_fiber(bs.asan_scheduler_fake_stack, nullptr, nullptr);
#endif
            progressed = true;
            if (f.done) ++finished;
          }
          if (!progressed) fail("deadlock: every live thread waits at a barrier that cannot complete");
        }
      }
  g_block = nullptr;
  g_fiber = nullptr;
#if ATTNKIT_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(smem_raw, emulated_smem_capacity);
#endif
}

}  // namespace attnkit_emu

// ---- CUDA built-ins --------------------------------------------------------------------------------

inline void __syncthreads() {
  if (attnkit_emu::g_fiber->copies.size() > 1000000) attnkit_emu::fail("runaway cp.async queue");
  attnkit_emu::meet(attnkit_emu::g_block->block_meet, [] {});
}
inline void __syncwarp(unsigned = 0xffffffffu) { attnkit_emu::warp_collective(attnkit_emu::op::sync); }
// Threads of the emulation never run concurrently: a plain read-modify-write is atomic.
inline unsigned long long atomicMin(unsigned long long* address, unsigned long long val) {
  const unsigned long long old = *address;
  if (val < old) *address = val;
  return old;
}
template <class T>
T __shfl_sync(unsigned, T v, int src) {
  return attnkit_emu::shuffle(v, src);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return attnkit_emu::shuffle(v, attnkit_emu::lane() ^ mask);
}

// ---- the instructions of attnkit/cuda/mma.cuh ------------------------------------------------------

namespace attnkit::cuda::detail {

inline void cp_async_16(void* smem_dst, const void* gmem_src) {
  if (reinterpret_cast<std::uintptr_t>(smem_dst) % 16 || reinterpret_cast<std::uintptr_t>(gmem_src) % 16)
    attnkit_emu::fail("cp.async with a source or destination that is not 16-byte aligned");
  attnkit_emu::require_smem(smem_dst, 16, "cp.async destination outside the block's shared memory");
  attnkit_emu::g_fiber->copies.push_back({smem_dst, gmem_src});
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {
  for (const auto& c : attnkit_emu::g_fiber->copies) std::memcpy(c.dst, c.src, 16);
  attnkit_emu::g_fiber->copies.clear();
}

inline void emu_ldmatrix(std::uint32_t (&r)[4], const void* row_address, attnkit_emu::op kind) {
  if (reinterpret_cast<std::uintptr_t>(row_address) % 16)
    attnkit_emu::fail("ldmatrix row address not 16-byte aligned");
  attnkit_emu::require_smem(row_address, 16, "ldmatrix row outside the block's shared memory");
  attnkit_emu::my_slot().address = row_address;
  attnkit_emu::warp_collective(kind);
  for (int i = 0; i < 4; ++i) r[i] = attnkit_emu::my_slot().out_regs[i];
}
inline void ldmatrix_x4(std::uint32_t (&r)[4], const void* row_address) {
  emu_ldmatrix(r, row_address, attnkit_emu::op::ldmatrix);
}
inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row_address) {
  emu_ldmatrix(r, row_address, attnkit_emu::op::ldmatrix_trans);
}

template <bool IsBf16>
void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  auto& s = attnkit_emu::my_slot();
  for (int i = 0; i < 4; ++i) s.a[i] = a[i], s.c[i] = d[i];
  s.b[0] = b0;
  s.b[1] = b1;
  attnkit_emu::warp_collective(IsBf16 ? attnkit_emu::op::mma_bf16 : attnkit_emu::op::mma_f16);
  for (int i = 0; i < 4; ++i) d[i] = attnkit_emu::my_slot().out_d[i];
}

}  // namespace attnkit::cuda::detail
