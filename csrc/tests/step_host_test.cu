// CPU test of the fused step's split of table blocks over warps and blocks of threads
// (csrc/twa_step.h), built by nvcc as a host program and run without a GPU: every block is
// taken by exactly one warp, in contiguous ranges, within the grid the plan asks for, and the
// projection's grid respects the y-dimension limit and covers every basis row. The warps' table
// look-ahead (window_load_of), walked the way step.cu's kernels walk it, gives every block's
// fields and reads nothing outside the warp's range. Over an int8 basis, the lanes' columns and
// scale blocks (int8_lane) cover every column once with its own block scale, one scale per
// lane in whole aligned blocks, and the kernels' sums (a scaled dot product per lane, split in
// two at a scale block boundary) equal a plain loop.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../twa_step.h"
#include "check.h"

using namespace twa::step;

namespace {

constexpr int64_t kWarpsPerCta = 8;

// Walk the split the way the kernels do (warp w of the grid takes [begin, end)).
void check_split(const BlockSplit& s, int64_t nblk, int64_t max_ctas) {
  CHECK(s.per_warp >= 1 && s.warps >= 1 && s.ctas >= 1, "nblk=%lld", (long long)nblk);
  CHECK(s.ctas <= (max_ctas < 1 ? 1 : max_ctas), "ctas=%lld max=%lld", (long long)s.ctas,
        (long long)max_ctas);
  CHECK(s.warps <= s.ctas * kWarpsPerCta && s.warps > (s.ctas - 1) * kWarpsPerCta,
        "warps=%lld ctas=%lld", (long long)s.warps, (long long)s.ctas);
  if (nblk <= 4096) {
    std::vector<int> seen(static_cast<size_t>(nblk), 0);
    int64_t expect = 0;
    for (int64_t w = 0; w < s.ctas * kWarpsPerCta; ++w) {
      const int64_t b = warp_begin(s, nblk, w), e = warp_end(s, nblk, w);
      CHECK(b <= e && e - b <= s.per_warp, "w=%lld", (long long)w);
      CHECK(b == expect || b == e, "warp %lld starts at %lld, expected %lld", (long long)w,
            (long long)b, (long long)expect);  // contiguous, in warp order
      for (int64_t i = b; i < e; ++i) ++seen[static_cast<size_t>(i)];
      if (e > b) expect = e;
      if (w >= s.warps) CHECK(b == e, "warp %lld past the split takes blocks", (long long)w);
    }
    for (int64_t i = 0; i < nblk; ++i) CHECK(seen[static_cast<size_t>(i)] == 1, "block %lld", (long long)i);
  } else {
    // Large (64-bit) sizes: the last warp ends at nblk, the first warp past the split is empty.
    CHECK(warp_end(s, nblk, s.warps - 1) == nblk, "nblk=%lld", (long long)nblk);
    CHECK(warp_begin(s, nblk, s.warps - 1) < nblk, "nblk=%lld", (long long)nblk);
    CHECK(warp_begin(s, nblk, s.warps) == nblk, "nblk=%lld", (long long)nblk);
  }
}

// One warp's lanes: the window, 32 bits per lane.
using Lanes = std::array<uint32_t, 32>;

struct Tables {
  std::vector<int64_t> ptab, btab;
};

// Random tables: every field a full 64-bit value (both halves non-zero, some negative), the
// block rows' parameter indices valid.
Tables random_tables(int64_t nparams, int64_t nblk, std::mt19937_64& rng) {
  Tables t;
  t.ptab.resize(static_cast<size_t>(nparams * kParamFields));
  t.btab.resize(static_cast<size_t>(nblk * kBlockFields));
  for (auto& v : t.ptab) v = static_cast<int64_t>(rng());
  for (auto& v : t.btab) v = static_cast<int64_t>(rng());
  for (int64_t b = 0; b < nblk; ++b) {
    t.btab[static_cast<size_t>(b * kBlockFields + kBlkParam)] = static_cast<int64_t>(rng() % nparams);
  }
  return t;
}

// The lanes' loads of the window of block blk of the range [begin, end): each inside the table
// and the range (block rows < end, a parameter row only for a block < end).
Lanes window_loads(const Tables& t, int64_t begin, int64_t end, int64_t blk, int64_t param) {
  Lanes w{};
  for (int lane = 0; lane < 32; ++lane) {
    const WindowLoad l = window_load_of(blk, end, param, lane);
    if (!l.load) continue;
    const std::vector<int64_t>& tab = l.ptab ? t.ptab : t.btab;
    const bool inside = l.index >= 0 && l.index < static_cast<int64_t>(tab.size()) &&
                        (l.ptab ? blk < end
                                : l.index >= begin * kBlockFields && l.index < end * kBlockFields);
    CHECK(inside && (l.half == 0 || l.half == 1), "blk=%lld lane=%d index=%lld", (long long)blk,
          lane, (long long)l.index);
    if (!inside) continue;
    const uint64_t v = static_cast<uint64_t>(tab[static_cast<size_t>(l.index)]);
    w[static_cast<size_t>(lane)] = static_cast<uint32_t>(v >> (32 * l.half));
  }
  return w;
}

// Value v of the window, as step.cu's window_value shuffles it out.
int64_t window_value(const Lanes& w, int v) {
  const uint64_t lo = w[static_cast<size_t>(v)], hi = w[static_cast<size_t>(v + kWinValues)];
  return static_cast<int64_t>((hi << 32) | lo);
}

// The kernels' walk of [begin, end): window of the first block, then per block its fields out
// of its window and the next block's window from the parameter index the window holds.
void check_window_walk(const Tables& t, int64_t begin, int64_t end) {
  Lanes win{};
  if (begin < end) {
    win = window_loads(t, begin, end, begin, t.btab[static_cast<size_t>(begin * kBlockFields + kBlkParam)]);
  }
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t* b = &t.btab[static_cast<size_t>(blk * kBlockFields)];
    const int64_t* p = &t.ptab[static_cast<size_t>(b[kBlkParam] * kParamFields)];
    for (int f = 0; f < kBlockFields; ++f) {
      CHECK(window_value(win, kWinBlock + f) == b[f], "blk=%lld block field %d", (long long)blk, f);
    }
    for (int f = 0; f < kParamFields; ++f) {
      CHECK(window_value(win, kWinParam + f) == p[f], "blk=%lld param field %d", (long long)blk, f);
    }
    for (int f = 0; f < kBlockFields; ++f) {
      const int64_t next = blk + 1 < end ? b[kBlockFields + f] : 0;  // 0 past the range
      CHECK(window_value(win, kWinNextBlock + f) == next, "blk=%lld next field %d", (long long)blk, f);
    }
    win = window_loads(t, begin, end, blk + 1, window_value(win, kWinNextBlock + kBlkParam));
  }
}

void check_windows() {
  std::mt19937_64 rng(7);
  for (int64_t nblk : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{9}, int64_t{64}, int64_t{301}}) {
    for (int64_t nparams : {int64_t{1}, int64_t{5}, int64_t{40}}) {
      const Tables t = random_tables(nparams, nblk, rng);
      for (int64_t max_ctas : {int64_t{1}, int64_t{3}, int64_t{132}}) {
        const BlockSplit s = split_blocks(nblk, max_ctas, kWarpsPerCta);
        for (int64_t w = 0; w < s.ctas * kWarpsPerCta; ++w) {
          check_window_walk(t, warp_begin(s, nblk, w), warp_end(s, nblk, w));
        }
      }
    }
  }
}


// ---- int8 basis: the lanes' columns and scale blocks over parameter lists ------------------

struct Int8Block {
  int64_t col0, values;
  bool aligned;  // the parameter's flat offset is a multiple of 16 (addresses taken aligned)
};

// The blocks of _param_table.Plan for parameters of these sizes.
std::vector<Int8Block> int8_blocks(const std::vector<int64_t>& sizes) {
  std::vector<Int8Block> out;
  int64_t off = 0;
  for (int64_t n : sizes) {
    for (int64_t s = 0; s < n; s += kBlockCols) {
      out.push_back({off + s, n - s < kBlockCols ? n - s : kBlockCols, off % 16 == 0});
    }
    off += n;
  }
  return out;
}

// Each lane's values, walked as step.cu's int8 kernels walk them, against a plain loop: every
// column in [0, D) once, its scale block col / 64 (< ceil(D / 64)); in blocks the kernels read
// in 16-byte loads one scale block per lane; the projection computed lane by lane (fast: one
// dot product times the lane's scale; masked: two dot products split at `split`) equals the
// plain sum of q * scale * g (in double, so only the order differs).
void check_int8_lanes(const std::vector<int64_t>& sizes, std::mt19937_64& rng) {
  const std::vector<Int8Block> blocks = int8_blocks(sizes);
  int64_t D = 0;
  for (int64_t n : sizes) D += n;
  const int64_t nsc = twa::scale_blocks(D);
  std::vector<int8_t> q(static_cast<size_t>(D));
  std::vector<double> g(static_cast<size_t>(D)), sc(static_cast<size_t>(nsc));
  std::uniform_int_distribution<int> byte(-128, 127);
  std::uniform_real_distribution<double> real(-1.0, 1.0);
  for (auto& v : q) v = static_cast<int8_t>(byte(rng));
  for (auto& v : g) v = real(rng);
  for (auto& v : sc) v = 0.5 + real(rng) * 0.25;
  double plain = 0.0, walked = 0.0, bound = 0.0;
  for (int64_t j = 0; j < D; ++j) {
    const double t = q[static_cast<size_t>(j)] * sc[static_cast<size_t>(j / 64)] * g[static_cast<size_t>(j)];
    plain += t;
    bound += std::fabs(t);
  }
  std::vector<int> seen(static_cast<size_t>(D), 0);
  for (const Int8Block& b : blocks) {
    for (bool vec : {true, false}) {
      const bool fast = int8_fast_block(vec, b.aligned, b.values);
      if (fast) CHECK(b.col0 % 16 == 0 && b.values == kBlockCols, "col0=%lld", (long long)b.col0);
      for (int lane = 0; lane < 32; ++lane) {
        const Int8Lane l = int8_lane(b.col0, b.values, lane);
        CHECK(l.col == b.col0 + 16 * lane && l.n >= 0 && l.n <= 16 && l.split >= 1 && l.split <= 16,
              "col0=%lld lane=%d n=%d split=%d", (long long)b.col0, lane, l.n, l.split);
        CHECK(l.n == std::max<int64_t>(0, std::min<int64_t>(16, b.values - 16 * lane)), "n=%d", l.n);
        if (fast) CHECK(l.n == 16 && l.blk_lo == l.blk_hi && l.split == 16, "fast lane %d", lane);
        if (l.n == 0) continue;
        CHECK(l.blk_hi < nsc && l.blk_hi - l.blk_lo <= 1, "blk %lld..%lld of %lld", (long long)l.blk_lo,
              (long long)l.blk_hi, (long long)nsc);
        // The lane's 16 bytes dequantised as the kernels do (int8x4_to_float on packed words).
        uint32_t word[4] = {0u, 0u, 0u, 0u};
        for (int e = 0; e < l.n; ++e) {
          word[e / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(q[static_cast<size_t>(l.col + e)]))
                         << (8 * (e % 4));
        }
        float v[16];
        for (int i = 0; i < 4; ++i) twa::int8x4_to_float(word[i], v + 4 * i);
        double lo = 0.0, hi = 0.0;
        for (int e = 0; e < 16; ++e) {
          const double ge = e < l.n ? g[static_cast<size_t>(l.col + e)] : 0.0;
          if (e < l.split) lo += v[e] * ge; else hi += v[e] * ge;
          if (e >= l.n) continue;
          const int64_t c = l.col + e;
          const int64_t blk = e < l.split ? l.blk_lo : l.blk_hi;
          CHECK(blk == c / 64, "col %lld: scale block %lld, expected %lld", (long long)c, (long long)blk,
                (long long)(c / 64));
          CHECK(v[e] == static_cast<float>(q[static_cast<size_t>(c)]), "col %lld value", (long long)c);
          if (vec) ++seen[static_cast<size_t>(c)];
        }
        if (vec) {
          walked += fast ? (lo + hi) * sc[static_cast<size_t>(l.blk_lo)]
                         : lo * sc[static_cast<size_t>(l.blk_lo)] + hi * sc[static_cast<size_t>(l.blk_hi)];
        }
      }
    }
  }
  for (int64_t j = 0; j < D; ++j) {
    if (seen[static_cast<size_t>(j)] != 1) {
      CHECK(false, "column %lld of D=%lld read %d times", (long long)j, (long long)D, seen[static_cast<size_t>(j)]);
      break;
    }
  }
  CHECK(std::fabs(walked - plain) <= 1e-12 * (bound + 1.0), "D=%lld: walked %.17g, plain %.17g",
        (long long)D, walked, plain);
}

void check_int8() {
  std::mt19937_64 rng(11);
  const std::vector<std::vector<int64_t>> lists = {
      {1}, {2}, {7}, {16}, {17}, {64}, {511}, {512}, {513}, {100003}, {17, 1}, {1, 17},
      {513, 3, 1024, 5}, {16, 48, 1, 512, 511, 2}, {15, 1, 64, 63, 65, 1000}, {3, 3, 3, 3, 3, 2048},
  };
  for (const auto& sizes : lists) check_int8_lanes(sizes, rng);
  std::uniform_int_distribution<int64_t> size(1, 3000);
  for (int t = 0; t < 40; ++t) {
    std::vector<int64_t> sizes(static_cast<size_t>(1 + t % 7));
    for (auto& n : sizes) n = size(rng);
    check_int8_lanes(sizes, rng);
  }
  // Large columns (64-bit): the scale blocks and split of a lane far past 2^31.
  const int64_t big = (int64_t{1} << 34) + 40;
  const Int8Lane l = int8_lane(big, kBlockCols, 1);
  CHECK(l.col == big + 16 && l.blk_lo == (big + 16) / 64 && l.blk_hi == (big + 31) / 64 &&
            l.split == 8,
        "big: blk %lld..%lld split %d", (long long)l.blk_lo, (long long)l.blk_hi, l.split);
}

}  // namespace

int main() {
  const int64_t sizes[] = {1, 2, 7, 8, 9, 63, 64, 65, 511, 1000, 4096, 50000, 1 << 22,
                           (int64_t{1} << 33) + 7};
  const int64_t limits[] = {0, 1, 3, 8, 132, 528, 1056, 65535};
  for (int64_t nblk : sizes) {
    for (int64_t max_ctas : limits) check_split(split_blocks(nblk, max_ctas, kWarpsPerCta), nblk, max_ctas);
  }

  // Projection grid: K tiles cover K; splits within both limits; the write grid as resident.
  const int64_t Ks[] = {1, 8, 31, 32, 33, 301, 512, 8192};
  for (int64_t K : Ks) {
    for (int64_t nblk : {int64_t{1}, int64_t{13}, int64_t{50000}}) {
      for (int64_t per_sm : {int64_t{1}, int64_t{2}, int64_t{4}}) {
        const ProjectSplit p = plan_project(K, nblk, 132, per_sm, kWarpsPerCta);
        CHECK(p.k_tiles * kTileRows >= K && (p.k_tiles - 1) * kTileRows < K, "K=%lld", (long long)K);
        const int64_t max_splits = (132 * per_sm) / p.k_tiles;
        CHECK(p.split.ctas <= (max_splits < 1 ? 1 : max_splits) && p.split.ctas <= kMaxSplits,
              "K=%lld nblk=%lld splits=%lld", (long long)K, (long long)nblk, (long long)p.split.ctas);
        check_split(p.split, nblk, max_splits);
        const BlockSplit w = plan_write(nblk, 132, per_sm, kWarpsPerCta);
        check_split(w, nblk, 132 * per_sm);
      }
    }
  }
  // A huge SM count never asks for more than the grid's y limit.
  const ProjectSplit big = plan_project(1, int64_t{1} << 40, int64_t{1} << 20, 64, kWarpsPerCta);
  CHECK(big.split.ctas <= kMaxSplits, "splits=%lld", (long long)big.split.ctas);

  check_windows();
  check_int8();

  return twa_check::summary("step_host_test");
}
