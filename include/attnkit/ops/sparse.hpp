// sparse_attention: exact softmax attention in which each query row sees only an allowed set of
// keys, at a cost proportional to the allowed pairs rather than to Nq x Nk.
//
// The allowed set is either an explicit CSR pattern or a sparse_pattern: the union of a (dilated)
// local window around the aligned diagonal, global tokens (Longformer), BigBird random key blocks
// and an optional explicit CSR pattern. attention_params then restrict and modify it exactly as in
// flash_attention (causal, window, kv_lengths, bias, ALiBi, softcap).
//
// Plan: work blocks are blocks of up to flash_tiles::block_q query rows of one (batch, head); see
// work_blocks for the exceptions (BigBird-aligned blocks, splits at global rows). For each block a
// block_plan lists the union of the keys its rows may see (sorted) together with, per key, the
// bitmask of the block's rows that own it. Work items are groups of up to group_blocks consecutive
// blocks: the K and V rows of the union of the group's keys are gathered (and converted) once into
// the thread's staging buffer, and each block streams its keys from there in tiles of
// flash_tiles::block_k through kernels::softmax_block, as flash does (a group whose union is too
// large for the staging, e.g. with a global row, reads contiguous K runs in place and gathers the
// rest per tile instead). Per tile only the keys some row of the block does not own are masked,
// element by element, to -inf. Scratch is O(group x union of the group's keys). Results are
// bitwise identical for any number of threads, and whether or not a group is staged.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <iterator>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "attnkit/core/attention_params.hpp"
#include "attnkit/core/parallel.hpp"
#include "attnkit/kernels/flash_tile.hpp"
#include "attnkit/ops/flash.hpp"

namespace attnkit {

// Allowed keys per query row, shared by all batches and heads: the keys of row i are
// col_idx[row_ptr[i] .. row_ptr[i + 1]), sorted and unique, each < Nk. row_ptr has Nq + 1 entries,
// row_ptr[0] == 0 and row_ptr[Nq] == col_idx.size().
struct csr_pattern {
  std::vector<index_t> row_ptr;
  std::vector<index_t> col_idx;
};

// A structured pattern, the union of its parts. Positions: key j sits at position j and query row i
// at position i + (Nk - Nq) (the aligned diagonal, as for causal masking), so with Nq == Nk row i is
// position i.
//  * window: with delta = j - (i + Nk - Nq), allows -window_left * dilation <= delta <=
//    window_right * dilation with delta % dilation == 0. Always contains the diagonal (window 0 0
//    is the diagonal alone); use a csr_pattern for patterns without a local part.
//  * global_tokens: key positions in [0, Nk). A global position attends to every key (as a query)
//    and is attended to by every query (as a key).
//  * random blocks (BigBird): query block qb = floor((i + Nk - Nq) / block_size) of query head h
//    sees min(random_blocks, ceil(Nk / block_size)) distinct key blocks (keys
//    [kb * block_size, (kb + 1) * block_size)), drawn deterministically from (seed, h, qb).
//  * extra: an optional explicit csr_pattern over (Nq, Nk), unioned with the above.
// to_csr(pattern, Nq, Nk, h) lists exactly the allowed keys of query head h.
struct sparse_pattern {
  index_t window_left = 0, window_right = 0;  // in units of `dilation` steps around the aligned diagonal
  index_t dilation = 1;
  std::vector<index_t> global_tokens;  // positions that see every key and are seen by every query
  index_t block_size = 64;             // for random blocks
  index_t random_blocks = 0;           // BigBird: random key blocks per query block
  std::uint64_t seed = 0;
  const csr_pattern* extra = nullptr;  // optional explicit pattern, unioned with the above
};

namespace detail {

// ---- validation ---------------------------------------------------------------------------------

inline void validate_csr(std::string_view fn, std::string_view prefix, const csr_pattern& c, index_t nq,
                         index_t nk) {
  const std::string rp = concat(prefix, "row_ptr"), ci = concat(prefix, "col_idx");
  require(c.row_ptr.size() == std::size_t(nq + 1), fn, rp, text("size Nq + 1 = ", nq + 1), c.row_ptr.size());
  require(c.row_ptr[0] == 0, fn, text(rp, "[0]"), "0", c.row_ptr[0]);
  require(c.row_ptr[std::size_t(nq)] == index_t(c.col_idx.size()), fn, text(rp, "[", nq, "]"),
          text("col_idx.size() = ", c.col_idx.size()), c.row_ptr[std::size_t(nq)]);
  for (index_t i = 0; i < nq; ++i) {
    const index_t b = c.row_ptr[std::size_t(i)], e = c.row_ptr[std::size_t(i + 1)];
    require(b <= e && e <= index_t(c.col_idx.size()), fn, text(rp, "[", i + 1, "]"),
            text("a value in [", b, ", ", c.col_idx.size(), "] (non-decreasing)"), e);
    for (index_t t = b; t < e; ++t) {
      const index_t j = c.col_idx[std::size_t(t)];
      require(0 <= j && j < nk, fn, text(ci, "[", t, "]"), text("a key index in [0, ", nk, ") (row ", i, ")"), j);
      if (t > b)
        require(j > c.col_idx[std::size_t(t - 1)], fn, text(ci, "[", t, "]"),
                text("a column greater than the previous one, ", c.col_idx[std::size_t(t - 1)], ", of row ", i,
                       " (sorted, unique)"),
                j);
    }
  }
}

inline void validate_pattern(std::string_view fn, const sparse_pattern& p, index_t nq, index_t nk) {
  require(p.window_left >= 0, fn, "pattern.window_left", "a value >= 0", p.window_left);
  require(p.window_right >= 0, fn, "pattern.window_right", "a value >= 0", p.window_right);
  require(p.dilation >= 1, fn, "pattern.dilation", "a value >= 1", p.dilation);
  require(p.block_size >= 1, fn, "pattern.block_size", "a value >= 1", p.block_size);
  require(p.random_blocks >= 0, fn, "pattern.random_blocks", "a value >= 0", p.random_blocks);
  for (std::size_t t = 0; t < p.global_tokens.size(); ++t)
    require(0 <= p.global_tokens[t] && p.global_tokens[t] < nk, fn, text("pattern.global_tokens[", t, "]"),
            text("a key position in [0, ", nk, ")"), p.global_tokens[t]);
  if (p.extra) validate_csr(fn, "pattern.extra->", *p.extra, nq, nk);
}

// ---- random blocks ------------------------------------------------------------------------------

inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The min(r, nkb) distinct key blocks of query block qb of head `head`, sorted, into `out`
// (Floyd's sampling driven by a splitmix64 stream seeded from (seed, head, qb): the same on every
// platform and for every thread count). `seen` is scratch.
inline void random_key_blocks(std::uint64_t seed, index_t head, index_t qb, index_t nkb, index_t r,
                              std::vector<index_t>& out, std::vector<char>& seen) {
  out.clear();
  if (nkb <= 0 || r <= 0) return;
  if (r >= nkb) {
    for (index_t kb = 0; kb < nkb; ++kb) out.push_back(kb);
    return;
  }
  std::uint64_t state = splitmix64(splitmix64(splitmix64(seed) ^ std::uint64_t(head)) ^ std::uint64_t(qb));
  const bool use_seen = r > 16;
  if (use_seen) seen.assign(std::size_t(nkb), 0);
  auto has = [&](index_t x) {
    return use_seen ? seen[std::size_t(x)] != 0 : std::find(out.begin(), out.end(), x) != out.end();
  };
  for (index_t n = nkb - r; n < nkb; ++n) {
    state = splitmix64(state);
    const index_t t = index_t(state % std::uint64_t(n + 1));
    const index_t pick = has(t) ? n : t;
    out.push_back(pick);
    if (use_seen) seen[std::size_t(pick)] = 1;
  }
  std::sort(out.begin(), out.end());
}

// ---- planning -----------------------------------------------------------------------------------

// A pattern resolved against (Nq, Nk): the parts that block_plan reads.
struct pattern_parts {
  index_t nq = 0, nk = 0, offset = 0;  // offset = Nk - Nq: position of query row i is i + offset
  bool window = false;
  index_t left = 0, right = 0, dilation = 1;  // allowed delta in [-left, right] (saturated), multiple of dilation
  std::vector<index_t> globals;               // sorted, unique
  index_t block_size = 1, random_blocks = 0;
  std::uint64_t seed = 0;
  const csr_pattern* extra = nullptr;
};

inline index_t saturating_mul(index_t a, index_t b, index_t cap) {
  index_t r = 0;
  return __builtin_mul_overflow(a, b, &r) || r > cap ? cap : r;
}

inline pattern_parts resolve(const sparse_pattern& p, index_t nq, index_t nk) {
  pattern_parts pp;
  pp.nq = nq;
  pp.nk = nk;
  pp.offset = nk - nq;
  pp.window = true;
  // |delta| < Nk + Nq for every pair, so saturating there keeps the set exact.
  const index_t cap = nk + nq + 1;
  pp.dilation = p.dilation;
  pp.left = saturating_mul(p.window_left, p.dilation, cap);
  pp.right = saturating_mul(p.window_right, p.dilation, cap);
  pp.globals = p.global_tokens;
  std::sort(pp.globals.begin(), pp.globals.end());
  pp.globals.erase(std::unique(pp.globals.begin(), pp.globals.end()), pp.globals.end());
  pp.block_size = p.block_size;
  pp.random_blocks = p.random_blocks;
  pp.seed = p.seed;
  pp.extra = p.extra;
  return pp;
}

inline pattern_parts resolve(const csr_pattern& c, index_t nq, index_t nk) {
  pattern_parts pp;
  pp.nq = nq;
  pp.nk = nk;
  pp.offset = nk - nq;
  pp.extra = &c;
  return pp;
}

// Bits c0..c1 (0 <= c0 <= c1 <= 63).
inline std::uint64_t bit_range(index_t c0, index_t c1) {
  return (~std::uint64_t(0) >> (63 - c1)) & (~std::uint64_t(0) << c0);
}

// The keys a block of at most 64 query rows may see and, per key, which rows own it.
struct block_plan {
  static constexpr index_t max_rows = 64;
  std::vector<index_t> keys;         // sorted union of the rows' allowed keys
  std::vector<std::uint64_t> owner;  // owner[t] bit c: row q0 + c may see keys[t]

  // Plans rows [q0, q0 + nrows) of query head `head`. When lo/hi are given, row q0 + c may in
  // addition only see keys in [lo[c], hi[c]) (attention_params' causal/window/kv_lengths range,
  // both non-decreasing in c). Keys no row owns are dropped.
  void build(const pattern_parts& pp, index_t head, index_t q0, index_t nrows, const index_t* lo = nullptr,
             const index_t* hi = nullptr) {
    keys.clear();
    owner.clear();
    if (nrows <= 0) return;
    const index_t p0 = q0 + pp.offset;  // position of the first row
    const std::uint64_t full = nrows == 64 ? ~std::uint64_t(0) : (std::uint64_t(1) << nrows) - 1;
    index_t kb_lo = 0, kb_hi = pp.nk;
    if (lo) {
      kb_lo = std::max(kb_lo, lo[0]);
      kb_hi = std::min(kb_hi, hi[nrows - 1]);
    }
    if (kb_lo >= kb_hi) return;

    // Rows that are global positions see every key.
    std::uint64_t global_rows = 0;
    const auto g_begin = pp.globals.begin(), g_end = pp.globals.end();
    for (auto g = std::lower_bound(g_begin, g_end, p0); g != g_end && *g < p0 + nrows; ++g)
      global_rows |= std::uint64_t(1) << (*g - p0);

    // Random blocks of the query blocks this block overlaps.
    draws_.clear();
    kbs_.clear();
    if (pp.random_blocks > 0) {
      const index_t bs = pp.block_size, nkb = (pp.nk + bs - 1) / bs;
      for (index_t qb = floor_div(p0, bs); qb <= floor_div(p0 + nrows - 1, bs); ++qb) {
        const index_t c0 = std::max<index_t>(0, qb * bs - p0), c1 = std::min(nrows - 1, (qb + 1) * bs - 1 - p0);
        random_key_blocks(pp.seed, head, qb, nkb, pp.random_blocks, tmp_, seen_);
        draws_.push_back({bit_range(c0, c1), index_t(kbs_.size()), index_t(kbs_.size() + tmp_.size())});
        kbs_.insert(kbs_.end(), tmp_.begin(), tmp_.end());
      }
    }

    // The union of the keys.
    if (global_rows) {
      for (index_t j = kb_lo; j < kb_hi; ++j) keys.push_back(j);
    } else {
      if (pp.window) add_window(pp, p0, nrows, kb_lo, kb_hi);
      if (!pp.globals.empty()) {
        cand_.assign(std::lower_bound(g_begin, g_end, kb_lo), std::lower_bound(g_begin, g_end, kb_hi));
        unite();
      }
      if (!draws_.empty()) {
        const index_t bs = pp.block_size;
        blocks_ = kbs_;
        std::sort(blocks_.begin(), blocks_.end());
        blocks_.erase(std::unique(blocks_.begin(), blocks_.end()), blocks_.end());
        cand_.clear();
        for (index_t kb : blocks_)
          for (index_t j = std::max(kb * bs, kb_lo); j < std::min((kb + 1) * bs, kb_hi); ++j) cand_.push_back(j);
        unite();
      }
      if (pp.extra) {
        cand_.clear();
        const auto& c = *pp.extra;
        for (index_t i = q0; i < q0 + nrows; ++i)
          for (index_t t = c.row_ptr[std::size_t(i)]; t < c.row_ptr[std::size_t(i + 1)]; ++t) {
            const index_t j = c.col_idx[std::size_t(t)];
            if (j >= kb_lo && j < kb_hi) cand_.push_back(j);
          }
        std::sort(cand_.begin(), cand_.end());
        cand_.erase(std::unique(cand_.begin(), cand_.end()), cand_.end());
        unite();
      }
    }
    if (keys.empty()) return;

    // Owners of every key.
    owner.assign(keys.size(), global_rows);
    std::uint64_t lattice = 0;  // bits c = 0, d, 2d, ... below 64
    for (index_t c = 0; c < 64; c += pp.dilation) lattice |= std::uint64_t(1) << c;
    auto g = std::lower_bound(g_begin, g_end, keys.front());
    index_t last_kb = -1;
    std::uint64_t random_rows = 0;
    for (std::size_t t = 0; t < keys.size(); ++t) {
      const index_t j = keys[t];
      std::uint64_t m = owner[t];
      if (pp.window) {
        // Row c owns j iff p0 + c in [j - right, j + left] and (j - p0 - c) % dilation == 0.
        const index_t c0 = std::max<index_t>(0, j - pp.right - p0), c1 = std::min(nrows - 1, j + pp.left - p0);
        if (c0 <= c1) {
          std::uint64_t w = bit_range(c0, c1);
          if (pp.dilation > 1) {
            const index_t rho = ((j - p0) % pp.dilation + pp.dilation) % pp.dilation;
            w &= rho < 64 ? lattice << rho : 0;
          }
          m |= w;
        }
      }
      while (g != g_end && *g < j) ++g;
      if (g != g_end && *g == j) m = full;
      if (!draws_.empty()) {
        const index_t kb = j / pp.block_size;
        if (kb != last_kb) {
          last_kb = kb;
          random_rows = 0;
          for (const auto& d : draws_)
            if (std::binary_search(kbs_.begin() + d.begin, kbs_.begin() + d.end, kb)) random_rows |= d.rows;
        }
        m |= random_rows;
      }
      owner[t] = m;
    }
    if (pp.extra) {
      const auto& c = *pp.extra;
      for (index_t r = 0; r < nrows; ++r) {
        auto pos = keys.begin();
        for (index_t t = c.row_ptr[std::size_t(q0 + r)]; t < c.row_ptr[std::size_t(q0 + r + 1)]; ++t) {
          pos = std::lower_bound(pos, keys.end(), c.col_idx[std::size_t(t)]);
          if (pos == keys.end()) break;
          if (*pos == c.col_idx[std::size_t(t)]) owner[std::size_t(pos - keys.begin())] |= std::uint64_t(1) << r;
        }
      }
    }
    // attention_params' ranges: rows [a, b) with hi[c] > j and lo[c] <= j, both moving forward with j.
    if (lo) {
      index_t a = 0, b = 0;
      for (std::size_t t = 0; t < keys.size(); ++t) {
        const index_t j = keys[t];
        while (a < nrows && hi[a] <= j) ++a;
        while (b < nrows && lo[b] <= j) ++b;
        owner[t] &= a < b ? bit_range(a, b - 1) : 0;
      }
    }
    // Drop keys no row owns.
    std::size_t n = 0;
    for (std::size_t t = 0; t < keys.size(); ++t)
      if (owner[t]) {
        keys[n] = keys[t];
        owner[n++] = owner[t];
      }
    keys.resize(n);
    owner.resize(n);
  }

 private:
  struct draw {
    std::uint64_t rows;  // rows of the block in this query block
    index_t begin, end;  // its key blocks: kbs_[begin, end), sorted
  };
  std::vector<draw> draws_;
  std::vector<index_t> kbs_, blocks_, tmp_, cand_, merged_;
  std::vector<char> seen_;

  // keys = keys U cand_ (both sorted, unique).
  void unite() {
    if (cand_.empty()) return;
    if (keys.empty()) {
      keys.swap(cand_);
      return;
    }
    merged_.clear();
    std::set_union(keys.begin(), keys.end(), cand_.begin(), cand_.end(), std::back_inserter(merged_));
    keys.swap(merged_);
  }

  // The window keys of positions p0 .. p0 + nrows - 1 within [kb_lo, kb_hi), sorted.
  void add_window(const pattern_parts& pp, index_t p0, index_t nrows, index_t kb_lo, index_t kb_hi) {
    const index_t d = pp.dilation, p1 = p0 + nrows - 1;
    if (d <= nrows) {  // every residue is present: one contiguous run
      for (index_t j = std::max(kb_lo, p0 - pp.left); j <= std::min(kb_hi - 1, p1 + pp.right); ++j) keys.push_back(j);
      return;
    }
    // Runs [p0 + s d, p1 + s d] for steps s with s d in [-left, right]; disjoint and ordered as d > nrows.
    const index_t s_lo = std::max(-(pp.left / d), floor_div(kb_lo - p1 + d - 1, d));
    const index_t s_hi = std::min(pp.right / d, floor_div(kb_hi - 1 - p0, d));
    for (index_t s = s_lo; s <= s_hi; ++s)
      for (index_t j = std::max(kb_lo, p0 + s * d); j <= std::min(kb_hi - 1, p1 + s * d); ++j) keys.push_back(j);
  }
};

// dst row r (of `cols` elements) = src row idx[r] converted to A; rows at src + idx[r] * rs.
template <class A, class T>
const A* gather_tile(const T* src, index_t rs, index_t cs, const index_t* idx, index_t rows, index_t cols,
                     std::size_t slot) {
  A* dst = kernels::thread_scratch<A>(slot, std::size_t(std::max<index_t>(rows * cols, 1)));
  for (index_t r = 0; r < rows; ++r) kernels::convert_tile(dst + r * cols, cols, src + idx[r] * rs, 1, cols, 0, cs);
  return dst;
}

// s[jj * ld + c] = -inf for the rows c (< 64) whose bit is clear in owner[jj] & full.
template <class A>
void mask_unowned(A* s, index_t ld, const std::uint64_t* owner, index_t nk, std::uint64_t full) {
  const A ninf = -std::numeric_limits<A>::infinity();
  for (index_t jj = 0; jj < nk; ++jj)
    for (std::uint64_t x = ~owner[jj] & full; x; x &= x - 1) s[jj * ld + std::countr_zero(x)] = ninf;
}

// The query rows' work blocks as (first row, rows), in order; they depend on the shape and the
// pattern only. Blocks of flash_tiles::block_q rows, except:
//  * with random blocks drawn per query block of block_size rows, when 48 or 32 rows (tiles the
//    micro-kernel runs at full speed) divide block_size, blocks of that many rows aligned to the
//    query blocks: every work block lies in one query block and all its rows share the same random
//    keys (with block_size 64 and 48-row blocks, half of the work blocks would straddle two query
//    blocks and compute both draws for all their rows);
//  * a block is split where its rows change between global positions (which see every key) and
//    others, so that a global row does not make the rows beside it compute every key.
inline std::vector<std::pair<index_t, index_t>> work_blocks(const pattern_parts& pp) {
  index_t r = flash_tiles::block_q, first = r;
  if (pp.random_blocks > 0)
    for (index_t a : {index_t(48), index_t(32)})
      if (a <= flash_tiles::block_q && pp.block_size % a == 0) {
        r = a;
        first = r - ((pp.offset % r) + r) % r;  // the next row whose position is a multiple of r
        break;
      }
  std::vector<std::pair<index_t, index_t>> blocks;
  const auto g_end = pp.globals.end();
  for (index_t q0 = 0, next = std::min(first, pp.nq); q0 < pp.nq; q0 = next, next = std::min(next + r, pp.nq)) {
    // Global rows of [q0, next) by position, split into runs of equal global-ness.
    auto g = std::lower_bound(pp.globals.begin(), g_end, q0 + pp.offset);
    index_t start = q0;
    while (start < next) {
      index_t end = next;
      if (g != g_end && *g - pp.offset < next) {
        const index_t gi = *g - pp.offset;  // first global row at or after start
        if (gi > start) {
          end = gi;
        } else {  // a run of consecutive global rows from start
          end = start;
          while (g != g_end && *g - pp.offset == end && end < next) ++g, ++end;
        }
      }
      blocks.emplace_back(start, end - start);
      start = end;
    }
  }
  return blocks;
}

// Work items are groups of up to group_blocks consecutive work blocks of one (batch, head): the K
// and V rows of the union of the group's keys are staged once, contiguous (and converted to the
// accumulation type), and every block of the group reads its tiles from there. A window's
// consecutive blocks share most of their keys, so each per-head K/V row (4 KiB apart in BSHD with
// 8 heads of 128 floats) is fetched from memory about (W + 192) / 192 times instead of (W + 48) / 48.
inline constexpr index_t group_blocks = 4;
// Largest staging (union keys x (head dim + value dim) elements, in bytes) a group uses; a group
// whose union is larger (e.g. one with a global row, which sees every key) runs block by block,
// reading K and V from the tensors as a single block would.
inline constexpr std::size_t max_stage_bytes = std::size_t(1) << 20;
// Work items per parallel_for chunk: a thread runs this many consecutive groups, and a group copies
// the rows it shares with the previous group of its chunk (same batch and kv head) from that
// group's staging, which is still in cache, rather than from K and V.
inline constexpr index_t group_chunk = 4;
// Measured on the Intel dev machine (bench_sparse, D 128, H 8): the rows a group stages that the
// previous one did not (48 keys' K and V rows per 48-row block of a window, each a cold 4 KiB-apart
// row) still cost ~12% at W 256 (timed by skipping them). Not faster, so not kept: software
// prefetches of the next group's new rows spread over this group's tiles (into L1 or L2), copying
// them a few rows at a time between this group's tiles, groups of 8 blocks, items ordered head
// first (so that the 8 heads' rows of a position, one 4 KiB page, are fetched together), reading K
// in place and staging only V, and a 16-row staircase at window edges (skips ~10% of a W 256
// block's products; the time did not move).

// The plans of one group of work blocks and the sorted union of their keys.
struct group_keys {
  std::array<block_plan, group_blocks> plans;
  std::vector<index_t> uni;
};

// Rows of src at idx[0..rows) (row r at src + idx[r] * rs, elements cs apart) converted to A, row r
// at dst + r * cols.
template <class A, class T>
void convert_rows(A* dst, const T* src, index_t rs, index_t cs, const index_t* idx, index_t rows, index_t cols) {
  for (index_t r = 0; r < rows; ++r) kernels::convert_tile(dst + r * cols, cols, src + idx[r] * rs, 1, cols, 0, cs);
}

// The operator: work items of up to `group` (<= group_blocks) work blocks, staged when the union
// of their keys needs at most `stage_bytes`. Neither changes a result bit: every block runs the same
// key tiles in the same order on the same values, wherever its K and V rows are read from.
template <class A, class TQ, class TK, class TV, class TO, class TL>
void sparse_run(const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k, const tensor_view<TV, 4>& v,
                const tensor_view<TO, 4>& out, const attention_params& p, const tensor_view<TL, 3>& lse,
                const attention_shape& s, const tensor_view<const float, 4>& bias, const pattern_parts& pp,
                index_t group = group_blocks, std::size_t stage_bytes = max_stage_bytes) {
  constexpr index_t BK = flash_tiles::block_k, R = block_plan::max_rows;
  static_assert(flash_tiles::block_q <= R, "a query block's rows must fit in a 64-bit owner mask");
  group = std::clamp<index_t>(group, 1, group_blocks);
  constexpr bool direct = std::is_same_v<std::remove_const_t<TK>, A>;
  const A scale = effective_scale<A>(p.scale, s.head_dim);
  const A cap = A(p.softcap);
  const bool ranged = p.causal || p.window_left >= 0 || p.window_right >= 0 || p.kv_lengths;
  const auto blocks = work_blocks(pp);
  const index_t nqb = index_t(blocks.size()), ngr = ceil_div(nqb, group), items = s.batch * s.q_heads * ngr;
  const index_t D = s.head_dim, Dv = s.value_dim;
  struct item_pos {
    index_t b, h, hk, i0, i1;
  };
  auto decode = [&](index_t w) {
    const index_t g = w % ngr, h = (w / ngr) % s.q_heads, b = w / (ngr * s.q_heads);
    return item_pos{b, h, h / s.group(), g * group, std::min(nqb, (g + 1) * group)};
  };
  auto prefetch_queries = [&](index_t w) {
    const item_pos it = decode(w);
    const auto& wb = blocks[std::size_t(it.i0)];
    if (q.stride(3) == 1)
      for (index_t c = 0; c < wb.second; ++c)
        simd::prefetch(&q(it.b, wb.first + c, it.h, 0), std::size_t(D) * sizeof(TQ));
  };
  parallel_for(items, group_chunk, [&](index_t w0, index_t w1) {
    kernels::softmax_block<A> blk;
    thread_local group_keys gk;
    thread_local std::vector<index_t> merged, pos, prev_uni;
    thread_local std::vector<A> stage[2];
    index_t prev_b = -1, prev_hk = -1;  // (batch, kv head) staged in stage[cur ^ 1], keys prev_uni
    int cur = 0;
    index_t lo[R], hi[R];
    for (index_t w = w0; w < w1; ++w) {
      const item_pos it = decode(w);
      const index_t b = it.b, h = it.h, hk = it.hk;
      const auto ed = kernels::make_editor<A>(p, bias, s, b, h);
      // The plans of the group's blocks and the union of their keys.
      auto& uni = gk.uni;
      uni.clear();
      for (index_t i = it.i0; i < it.i1; ++i) {
        const auto [q0, rows] = blocks[std::size_t(i)];
        if (ranged)
          for (index_t c = 0; c < rows; ++c) ed.key_range(q0 + c, lo[c], hi[c]);
        auto& plan = gk.plans[std::size_t(i - it.i0)];
        plan.build(pp, h, q0, rows, ranged ? lo : nullptr, ranged ? hi : nullptr);
        const auto& ks = plan.keys;
        if (uni.empty() || ks.empty() || ks.front() > uni.back()) {
          uni.insert(uni.end(), ks.begin(), ks.end());
        } else {
          merged.clear();
          std::set_union(uni.begin(), uni.end(), ks.begin(), ks.end(), std::back_inserter(merged));
          uni.swap(merged);
        }
      }
      const index_t nu = index_t(uni.size());
      const bool staged =
          it.i1 - it.i0 > 1 && nu > 0 && std::size_t(nu) * std::size_t(D + Dv) * sizeof(A) <= stage_bytes;
      A *ks = nullptr, *vs = nullptr;
      if (staged) {
        auto& buf = stage[cur];
        if (buf.size() < std::size_t(nu * (D + Dv))) buf.resize(std::size_t(nu * (D + Dv)));
        ks = buf.data();
        vs = ks + nu * D;
        // Rows the thread's last staged group of this chunk staged for the same (batch, kv head)
        // are copied from there (in cache, contiguous); the others are read from k and v.
        const bool reuse = prev_b == b && prev_hk == hk;
        const index_t pn = reuse ? index_t(prev_uni.size()) : 0;  // prev_uni may be another call's
        const A* pk = reuse ? stage[cur ^ 1].data() : nullptr;
        const A* pv = reuse ? pk + pn * D : nullptr;
        for (index_t u = 0, x = 0; u < nu;) {
          if (reuse) {
            while (x < pn && prev_uni[std::size_t(x)] < uni[std::size_t(u)]) ++x;
          }
          index_t e = u;
          if (reuse && x < pn && prev_uni[std::size_t(x)] == uni[std::size_t(u)]) {
            // a run of keys present in both, consecutively
            while (e < nu && x + (e - u) < pn && prev_uni[std::size_t(x + e - u)] == uni[std::size_t(e)]) ++e;
            std::copy(pk + x * D, pk + (x + e - u) * D, ks + u * D);
            std::copy(pv + x * Dv, pv + (x + e - u) * Dv, vs + u * Dv);
            x += e - u;
          } else {
            e = u + 1;
            convert_rows(ks + u * D, &k(b, 0, hk, 0), k.stride(1), k.stride(3), uni.data() + u, 1, D);
            convert_rows(vs + u * Dv, &v(b, 0, hk, 0), v.stride(1), v.stride(3), uni.data() + u, 1, Dv);
          }
          u = e;
        }
        prev_uni.assign(uni.begin(), uni.end());
        prev_b = b;
        prev_hk = hk;
        cur ^= 1;
      }
      for (index_t i = it.i0; i < it.i1; ++i) {
        const auto [q0, rows] = blocks[std::size_t(i)];
        const block_plan& plan = gk.plans[std::size_t(i - it.i0)];
        const index_t n = index_t(plan.keys.size());
        const index_t* keys = plan.keys.data();
        if (staged) {  // pos[t]: where keys[t] sits in the union
          pos.resize(std::size_t(n));
          for (index_t t = 0, u = 0; t < n; ++t) {
            while (uni[std::size_t(u)] < keys[t]) ++u;
            pos[std::size_t(t)] = u;
          }
        }
        const std::uint64_t full = rows == 64 ? ~std::uint64_t(0) : (std::uint64_t(1) << rows) - 1;
        blk.start(rows, D, Dv, BK);
        if (n > 0) blk.load_queries(&q(b, q0, h, 0), q.stride(1), q.stride(3), scale);
        for (index_t t0 = 0, nk = 0; t0 < n; t0 += nk) {
          nk = std::min(BK, n - t0);
          // A block's query and output rows are each touched once, one cold stretch of memory per
          // row: during the last tile, bring in this block's output rows and the next block's
          // query rows (measured: ~3% on windows of 256 keys).
          if (t0 + nk >= n) {
            if (i + 1 < it.i1) {
              if (q.stride(3) == 1)
                for (index_t c = 0; c < blocks[std::size_t(i + 1)].second; ++c)
                  simd::prefetch(&q(b, blocks[std::size_t(i + 1)].first + c, h, 0), std::size_t(D) * sizeof(TQ));
            } else if (w + 1 < items) {
              prefetch_queries(w + 1);
            }
            if (out.stride(3) == 1)
              for (index_t c = 0; c < rows; ++c) simd::prefetch(&out(b, q0 + c, h, 0), std::size_t(Dv) * sizeof(TO));
          }
          const index_t* kk = keys + t0;
          index_t run = 1;
          while (run < nk && kk[run] == kk[0] + run) ++run;
          // A run of at least half a tile is read in place rather than gathered with what follows
          // (the same tiles whether staged or not).
          if (direct && run < nk && run >= BK / 2) nk = run;
          const bool contiguous = run >= nk;
          index_t krs = D, kcs = 1;
          const A *kt, *vt;
          if (staged) {
            const index_t* pt = pos.data() + t0;
            kt = contiguous ? ks + pt[0] * D : gather_tile<A>(ks, D, 1, pt, nk, D, kernels::slot_k_tile);
            vt = contiguous ? vs + pt[0] * Dv : gather_tile<A>(vs, Dv, 1, pt, nk, Dv, kernels::slot_v_tile);
          } else {
            kt = contiguous ? kernels::tile_as<A>(&k(b, kk[0], hk, 0), nk, D, k.stride(1), k.stride(3),
                                                  kernels::slot_k_tile, krs, kcs)
                            : gather_tile<A>(&k(b, 0, hk, 0), k.stride(1), k.stride(3), kk, nk, D,
                                             kernels::slot_k_tile);
            if (!contiguous) krs = D, kcs = 1;
            // V rows are always staged contiguous, even where they could be read in place: the
            // accumulation reads each V row once per 8 value dims, and per-head rows 4 KiB or more
            // apart then cost more (address translation) than the copy. Intel dev machine, N 4096,
            // D 128, 2 threads: W 512 1.15-1.2x, BigBird 1.15x, W 256 1.05x.
            vt = gather_tile<A>(&v(b, 0, hk, 0), v.stride(1), v.stride(3), kk, nk, Dv, kernels::slot_v_tile);
          }
          A* st = blk.scores(kt, krs, kcs, nk);
          if (cap > 0) kernels::apply_softcap(st, nk * blk.ld(), cap);
          if (ed.has_additive()) ed.apply(st, blk.ld(), 1, nk, [kk](index_t jj) { return kk[jj]; }, q0, rows, false);
          const std::uint64_t* own = plan.owner.data() + t0;
          bool partial = false;
          for (index_t jj = 0; jj < nk && !partial; ++jj) partial = (own[jj] & full) != full;
          if (partial) mask_unowned(st, blk.ld(), own, nk, full);
          blk.update(nk);
          blk.accumulate(vt, Dv, 1, nk);
        }
        TL* lse_ptr = lse.data() ? &lse(b, h, q0) : nullptr;
        blk.finish(&out(b, q0, h, 0), out.stride(1), out.stride(3), lse_ptr, lse.data() ? lse.stride(2) : 0);
      }
    }
  });
}

template <class TQ, class TK, class TV, class TO, class TL, class Pattern>
void sparse_dispatch(const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k, const tensor_view<TV, 4>& v,
                     const tensor_view<TO, 4>& out, const Pattern& pattern, const attention_params& p,
                     const tensor_view<TL, 3>& lse, index_t group = group_blocks,
                     std::size_t stage_bytes = max_stage_bytes) {
  check_element_types<TQ, TK, TV, TO, TL>();
  constexpr const char* fn = "sparse_attention";
  const attention_shape s = validate_attention(fn, q, k, v, out, p, lse);
  if constexpr (std::is_same_v<Pattern, sparse_pattern>) validate_pattern(fn, pattern, s.q_len, s.kv_len);
  else validate_csr(fn, "pattern.", pattern, s.q_len, s.kv_len);
  if (s.batch == 0 || s.q_len == 0 || s.q_heads == 0) return;
  const auto bias = broadcast_to(p.bias, {s.batch, s.q_heads, s.q_len, s.kv_len});
  sparse_run<softmax_accum_t<TQ>>(q, k, v, out, p, lse, s, bias, resolve(pattern, s.q_len, s.kv_len), group,
                                   stage_bytes);
}

}  // namespace detail

// The exact allowed set of `pattern` for query head `head` over Nq query rows and Nk keys (see
// sparse_pattern). Throws attnkit::error for an invalid pattern.
inline csr_pattern to_csr(const sparse_pattern& pattern, index_t Nq, index_t Nk, index_t head) {
  constexpr const char* fn = "to_csr";
  detail::require(Nq >= 0, fn, "Nq", "a value >= 0", Nq);
  detail::require(Nk >= 0, fn, "Nk", "a value >= 0", Nk);
  detail::require(head >= 0, fn, "head", "a value >= 0", head);
  detail::validate_pattern(fn, pattern, Nq, Nk);
  const detail::pattern_parts pp = detail::resolve(pattern, Nq, Nk);
  csr_pattern r;
  r.row_ptr.reserve(std::size_t(Nq + 1));
  r.row_ptr.push_back(0);
  detail::block_plan plan;
  constexpr index_t R = detail::block_plan::max_rows;
  for (index_t q0 = 0; q0 < Nq; q0 += R) {
    const index_t rows = std::min(R, Nq - q0);
    plan.build(pp, head, q0, rows);
    for (index_t c = 0; c < rows; ++c) {
      for (std::size_t t = 0; t < plan.keys.size(); ++t)
        if ((plan.owner[t] >> c) & 1) r.col_idx.push_back(plan.keys[t]);
      r.row_ptr.push_back(index_t(r.col_idx.size()));
    }
  }
  return r;
}

// Exact softmax attention over the keys `pattern` allows (per query head h: to_csr(pattern, Nq,
// Nk, h)), further restricted and modified by `p` exactly as in flash_attention. Equals
// reference_attention with an additive bias of 0 on allowed and -inf on other pairs (a key outside
// the pattern is not read at all, so a NaN there does not reach rows that cannot see it). A row
// with no allowed key gets 0 and lse -inf. Work and scratch are proportional to the allowed pairs
// (plus, per block of flash_tiles::block_q rows, the keys other rows of the block own).
template <class TQ, class TK, class TV, class TO, class TL = TO>
void sparse_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                      const sparse_pattern& pattern, const attention_params& p = {}, tensor_view<TL, 3> lse = {}) {
  detail::sparse_dispatch(q, k, v, out, pattern, p, lse);
}

// The same over an explicit pattern, shared by all batches and heads.
template <class TQ, class TK, class TV, class TO, class TL = TO>
void sparse_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                      const csr_pattern& pattern, const attention_params& p = {}, tensor_view<TL, 3> lse = {}) {
  detail::sparse_dispatch(q, k, v, out, pattern, p, lse);
}

}  // namespace attnkit
