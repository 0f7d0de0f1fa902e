// CPU test of the kernels' index arithmetic (csrc/twa_common.h), built by nvcc as a host program
// and run without a GPU. It replays the kernels' walks over columns, tiles, lanes and splits with
// the same helpers and checks them against plain loops: coverage of every column exactly once,
// 16-byte alignment of every vector load, no read or write outside [0, D) (memory around the
// rows holds NaN, so a wrong tail or head mask poisons the result), the partial-sum layout, the
// fixed reduction order and 64-bit offsets. The int8 basis: the byte-permute dequantisation
// against the plain conversion for every byte value, the int8 column layout (every group inside
// one scale block) and the int8 project and reconstruct walks with their block scales.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../twa_common.h"
#include "check.h"

using namespace twa;

namespace {

const float kNaN = std::nanf("");

// Rows of D values inside a wider allocation: `lead` elements before column 0 of row 0, row
// stride ld >= D, and everything that is not basis[k, j] for j < D set to NaN.
struct PoisonedBasis {
  std::vector<float> mem;
  int64_t lead, ld, K, D;
  PoisonedBasis(int64_t K_, int64_t D_, int64_t ld_, int64_t lead_, std::mt19937& rng)
      : lead(lead_), ld(ld_), K(K_), D(D_) {
    mem.assign(static_cast<size_t>(lead + K * ld + 64), kNaN);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < D; ++j) at(k, j) = u(rng);
  }
  float& at(int64_t k, int64_t j) { return mem[static_cast<size_t>(lead + k * ld + j)]; }
  // Raw read the way a kernel reads: any column, poisoned outside the row.
  float raw(int64_t k, int64_t col) const {
    const int64_t i = lead + k * ld + col;
    if (i < 0 || i >= static_cast<int64_t>(mem.size())) return kNaN;
    return mem[static_cast<size_t>(i)];
  }
};

// The kernel's load_group: V raw values when group_full, else masked scalars.
void load_group_emul(const PoisonedBasis& P, int64_t k, int64_t col0, const ColumnLayout& L,
                     float* v) {
  if (group_full(L, col0)) {
    for (int e = 0; e < L.V; ++e) v[e] = P.raw(k, col0 + e);
  } else {
    for (int e = 0; e < L.V; ++e) v[e] = col_valid(L, col0 + e) ? P.raw(k, col0 + e) : 0.f;
  }
}

float butterfly(float lanes[kWarp]) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    float next[kWarp];
    for (int l = 0; l < kWarp; ++l) next[l] = lanes[l] + lanes[xor_partner(l, offset)];
    for (int l = 0; l < kWarp; ++l) lanes[l] = next[l];
  }
  for (int l = 1; l < kWarp; ++l) CHECK(lanes[l] == lanes[0], "butterfly lanes disagree");
  return lanes[0];
}

void test_layout() {
  const int sizes[] = {2, 4};
  for (int es : sizes) {
    const int V = vec_elems(es);
    CHECK(V * es == kVecBytes, "es=%d", es);
    for (int64_t D : {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1000}) {
      for (int off = 0; off < kVecBytes; off += es) {
        for (int64_t extra : {0, 1, 3, 8, 13, 64}) {
          for (int64_t rows : {1, 2, 5}) {
            const int64_t ld = D + extra;
            const uint64_t base = 0x7f0000001000ull + static_cast<uint64_t>(off);
            const ColumnLayout L = make_layout(base, ld, rows, D, es);
            const bool phase = rows <= 1 || (ld * es) % kVecBytes == 0;
            CHECK(L.vec == phase, "vec D=%ld ld=%ld rows=%ld es=%d", (long)D, (long)ld,
                  (long)rows, es);
            CHECK(L.origin <= 0 && L.origin > -V, "origin %ld", (long)L.origin);
            CHECK(L.V == V, "V");
            const int64_t G = num_groups(L);
            CHECK(group_col(L, 0) <= 0, "first group starts after column 0");
            CHECK(group_col(L, G - 1) < D && group_col(L, G - 1) + V >= D, "last group D=%ld",
                  (long)D);
            int64_t full = 0;
            for (int64_t g = 0; g < G; ++g) {
              const int64_t c = group_col(L, g);
              if (!group_full(L, c)) continue;
              ++full;
              CHECK(c >= 0 && c + V <= D, "full group outside [0, D)");
              for (int64_t r = 0; r < rows; ++r) {
                const uint64_t addr = base + static_cast<uint64_t>((r * ld + c) * es);
                CHECK(addr % kVecBytes == 0, "misaligned vector load row %ld col %ld",
                      (long)r, (long)c);
              }
            }
            if (L.vec) {
              const int64_t head = L.origin == 0 ? 0 : L.origin + V;
              const int64_t expect = head >= D ? 0 : (D - head) / V;
              CHECK(full == expect, "full groups %ld, expected %ld (D=%ld off=%d)", (long)full,
                    (long)expect, (long)D, off);
            } else {
              CHECK(full == 0, "vector load without a shared phase");
            }
          }
        }
      }
    }
  }
  // An address that is not a multiple of the element size never takes the vector path.
  CHECK(!make_layout(0x1001, 64, 4, 64, 2).vec, "odd address");
}

void test_small_helpers() {
  const int expect[] = {0, 1, 2, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16};
  for (int B = 1; B <= 16; ++B) CHECK(batch_tile(B) == expect[B], "batch_tile(%d)", B);
  CHECK(batch_tile(17) == kMaxBatch, "batch_tile caps at kMaxBatch");
  for (int V : {4, 8}) {
    for (int bmax : {1, 2, 4, 8, 16}) {
      const int U = project_groups_per_lane(V, bmax);
      const int TD = project_tile_cols(V, bmax);
      CHECK(U >= 1 && U <= kMaxGroupsPerLane, "U=%d", U);
      CHECK(TD == kWarp * U * V && bmax * TD <= kXTileElems, "TD=%d bmax=%d", TD, bmax);
    }
    CHECK(orth_tile_cols(V) == kThreads * V, "orth TD");
    CHECK(orth_groups_per_lane(V) * kWarp * V == orth_tile_cols(V), "orth U");
    CHECK(orth_tile_cols(V) * 8 <= 16384, "orth x tile fits 16 KiB");
  }
  CHECK(ceil_div(0, 5) == 0 && ceil_div(1, 5) == 1 && ceil_div(5, 5) == 1 && ceil_div(6, 5) == 2,
        "ceil_div");

  const double nan = std::nan("");
  CHECK(std::isnan(nan_max(nan, 1.0)) && std::isnan(nan_max(1.0, nan)), "nan_max keeps NaN");
  CHECK(nan_max(2.0, 3.0) == 3.0 && nan_max(3.0, 2.0) == 3.0 && nan_max(0.0, 0.0) == 0.0, "max");
  CHECK(clamp_keep_nan(1e9, 65504.0) == 65504.0 && clamp_keep_nan(-1e9, 65504.0) == -65504.0,
        "clamp");
  CHECK(clamp_keep_nan(3.0, 65504.0) == 3.0 && std::isnan(clamp_keep_nan(nan, 1.0)), "clamp NaN");

  for (int64_t r : {0, 1, 2, 7, 512, 2048}) {
    const OrthWorkspace W{r};
    // Regions follow each other without gaps or overlap.
    CHECK(W.sums1() == 0 && W.c1() == W.sums1() + r + 1 && W.coef1() == W.c1() + r &&
              W.sums2() == W.coef1() + r && W.coef2() == W.sums2() + r + 2 &&
              W.inv() == W.coef2() + r && W.size() == W.inv() + 1,
          "workspace layout r=%ld", (long)r);
  }
}

void test_split_plan() {
  for (int64_t tiles : {1, 2, 3, 5, 31, 32, 33, 527, 528, 529, 1000, 12207, 100003}) {
    for (int64_t ms : {1, 2, 3, 7, 132, 528, 65535}) {
      const SplitPlan p = make_split_plan(tiles, ms);
      CHECK(p.splits >= 1 && p.splits <= ms && p.splits <= tiles, "splits %ld", (long)p.splits);
      int64_t next = 0;
      for (int64_t s = 0; s < p.splits; ++s) {
        CHECK(split_tile_begin(p, s) == next, "gap before split %ld", (long)s);
        CHECK(split_tile_end(p, s) > split_tile_begin(p, s), "empty split %ld", (long)s);
        next = split_tile_end(p, s);
      }
      CHECK(next == tiles, "tiles not covered: %ld of %ld", (long)next, (long)tiles);
      // A split count close to the target keeps the GPU full: at least half of it.
      CHECK(2 * p.splits >= (tiles < ms ? tiles : ms), "too few splits %ld", (long)p.splits);
    }
  }
}

// project: replays stage 1 as the kernel walks it (balanced K tiles x splits; warp-owned rows;
// per lane, the masked head step, the full steps, the masked tail steps; one butterfly per row
// and batch row at the end), then stage 2; batches above kProjectBatch in passes.
void test_project(std::mt19937& rng) {
  struct Case {
    int64_t K, D, extra, lead;
    int B, es, blocks_per_sm, sms;
  };
  const Case cases[] = {
      {1, 1, 0, 0, 1, 2, 2, 132},   {3, 1, 7, 5, 5, 2, 2, 132},   {1, 7, 0, 3, 1, 2, 2, 132},
      {3, 8, 0, 0, 2, 4, 1, 4},     {3, 2053, 3, 1, 5, 2, 1, 7},  {5, 2053, 8, 8, 1, 2, 3, 1},
      {130, 301, 5, 2, 1, 4, 2, 132}, {2, 4099, 1, 7, 16, 2, 1, 5}, {4, 10007, 0, 0, 3, 4, 2, 11},
      {129, 2049, 11, 6, 9, 2, 1, 2}, {2, 9000, 24, 4, 1, 4, 1, 1}, {7, 65537, 16, 13, 4, 2, 2, 132},
      {301, 5000, 0, 0, 1, 2, 2, 3},
  };
  for (const Case& c : cases) {
    const int V = vec_elems(c.es);
    const int64_t ld = c.D + c.extra;
    PoisonedBasis P(c.K, c.D, ld, c.lead, rng);
    std::vector<float> x(static_cast<size_t>(c.B * c.D));
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto& v : x) v = u(rng);
    // The element address seen by make_layout: lead elements past a 16-byte boundary.
    const uint64_t base = 0x7f0000000000ull + static_cast<uint64_t>(c.lead * c.es);
    const ColumnLayout L = make_layout(base, ld, c.K, c.D, c.es);
    std::vector<float> got_all(static_cast<size_t>(c.B * c.K), kNaN);
    for (int64_t p0 = 0; p0 < c.B; p0 += kProjectBatch) {
      const int nb = static_cast<int>(min64(kProjectBatch, c.B - p0));
      const int bmax = batch_tile(nb);
      const int RW = project_rows_per_warp(bmax);
      const int G = project_groups_per_step(bmax);
      const int TD = project_step_cols(V, bmax);
      CHECK(RW * G >= 4, "loads per step %d", RW * G);
      const int64_t k_tiles = ceil_div(c.K, project_rows_per_block(bmax));
      const SplitPlan sp = make_split_plan(
          num_tiles(L, TD), max_splits_resident(c.sms, c.blocks_per_sm, k_tiles));
      CHECK(k_tiles * sp.splits <= max64(k_tiles, c.blocks_per_sm * c.sms), "more than one wave");
      const int64_t ft0 = full_tile_begin(L), ft1 = full_tile_end(L, TD);
      // tile_full agrees with group_full on every group of every tile.
      for (int64_t t = 0; t < num_tiles(L, TD); ++t) {
        bool all = true;
        for (int g = 0; g < TD / V; ++g) all = all && group_full(L, tile_col0(L, t, TD) + g * V);
        CHECK(all == tile_full(L, t, TD), "tile_full(%ld) D=%ld", (long)t, (long)c.D);
        CHECK(!tile_full(L, t, TD) || (t >= ft0 && t < ft1), "full range");
      }
      std::vector<float> partial(static_cast<size_t>(sp.splits * nb * c.K), kNaN);
      std::vector<int> seen(static_cast<size_t>(c.D), 0);
      for (int64_t kt = 0; kt < k_tiles; ++kt) {
        const int64_t row0 = balanced_begin(c.K, k_tiles, kt);
        const int rows = static_cast<int>(balanced_begin(c.K, k_tiles, kt + 1) - row0);
        CHECK(rows >= 1 && rows <= project_rows_per_block(bmax), "rows %d", rows);
        for (int64_t s = 0; s < sp.splits; ++s) {
          const int64_t t0 = split_tile_begin(sp, s), t1 = split_tile_end(sp, s);
          const int64_t f_end = min64(t1, ft1);
          const int64_t f_begin = min64(t1, max64(t0, ft0));
          // The steps in the kernel's order: head, tail (masked), then the full ones. Each
          // lane's sums do not depend on the order of whole steps only if it is fixed: replay
          // exactly the kernel's.
          std::vector<int64_t> order;
          for (int64_t t = t0; t < f_begin; ++t) order.push_back(t);
          for (int64_t t = max64(f_begin, f_end); t < t1; ++t) order.push_back(t);
          for (int64_t t = f_begin; t < f_end; ++t) {
            CHECK(tile_full(L, t, TD), "unmasked step %ld is not full", (long)t);
            order.push_back(t);
          }
          CHECK(static_cast<int64_t>(order.size()) == t1 - t0, "steps of split %ld", (long)s);
          for (int warp = 0; warp < kWarps; ++warp) {
            for (int i = 0; i < RW; ++i) {
              const int r = warp + i * kWarps;
              if (r >= rows) continue;
              for (int b = 0; b < nb; ++b) {
                float lanes[kWarp];
                for (int lane = 0; lane < kWarp; ++lane) {
                  float acc = 0.f;
                  for (int64_t t : order) {
                    const int64_t c0 = tile_col0(L, t, TD);
                    for (int uu = 0; uu < G; ++uu) {
                      const int64_t col0 = lane_group_col(c0, uu, lane, V);
                      float v[8];
                      load_group_emul(P, row0 + r, col0, L, v);
                      for (int e = 0; e < V; ++e) {
                        const int64_t col = col0 + e;
                        const float xv = col_valid(L, col) ? x[static_cast<size_t>((p0 + b) * c.D + col)] : 0.f;
                        acc = std::fma(v[e], xv, acc);
                        if (kt == 0 && r == 0 && b == 0 && col_valid(L, col)) ++seen[static_cast<size_t>(col)];
                      }
                    }
                  }
                  lanes[lane] = acc;
                }
                const int64_t idx = partial_index(s, b, row0 + r, nb, c.K);
                CHECK(idx >= 0 && idx < static_cast<int64_t>(partial.size()), "partial index");
                CHECK(std::isnan(partial[static_cast<size_t>(idx)]), "partial written twice");
                partial[static_cast<size_t>(idx)] = butterfly(lanes);
              }
            }
          }
        }
      }
      for (int64_t j = 0; j < c.D; ++j) {
        CHECK(seen[static_cast<size_t>(j)] == 1, "column %ld visited %d times (D=%ld)", (long)j,
              seen[static_cast<size_t>(j)], (long)c.D);
      }
      // Stage 2 of this pass.
      const int64_t n = nb * c.K;
      for (int64_t i = 0; i < n; ++i) {
        float lanes[kWarp];
        for (int lane = 0; lane < kWarp; ++lane) {
          float sum = 0.f;
          for (int64_t k = stage2_first(lane); k < sp.splits; k += stage2_stride()) {
            CHECK(!std::isnan(partial[static_cast<size_t>(k * n + i)]), "partial not written");
            sum += partial[static_cast<size_t>(k * n + i)];
          }
          lanes[lane] = sum;
        }
        got_all[static_cast<size_t>(p0 * c.K + i)] = butterfly(lanes);
      }
    }
    double worst = 0.0;
    for (int64_t i = 0; i < c.B * c.K; ++i) {
      const int64_t b = i / c.K, k = i % c.K;
      double ref = 0.0, mag = 0.0;
      for (int64_t j = 0; j < c.D; ++j) {
        const double t = static_cast<double>(P.at(k, j)) * x[static_cast<size_t>(b * c.D + j)];
        ref += t;
        mag += std::fabs(t);
      }
      const double err = std::fabs(got_all[static_cast<size_t>(i)] - ref) / (mag + 1e-30);
      worst = err > worst || std::isnan(err) ? err : worst;
    }
    CHECK(worst < 1e-5, "project K=%ld D=%ld B=%d es=%d: relative error %g", (long)c.K,
          (long)c.D, c.B, c.es, worst);
  }
  // Balanced K tiles: 301 rows in 3 tiles of 100, 100, 101; sizes never differ by more than 1.
  CHECK(balanced_begin(301, 3, 1) == 100 && balanced_begin(301, 3, 2) == 200 &&
            balanced_begin(301, 3, 3) == 301,
        "301 in 3");
  for (int64_t n : {1, 7, 31, 32, 33, 301, 8192}) {
    for (int64_t parts : {1, 2, 3, 10, 31}) {
      if (parts > n) continue;
      for (int64_t i = 0; i < parts; ++i) {
        const int64_t len = balanced_begin(n, parts, i + 1) - balanced_begin(n, parts, i);
        CHECK(len == n / parts || len == n / parts + 1, "balanced n=%ld parts=%ld", (long)n, (long)parts);
      }
    }
  }
  CHECK(max_splits_resident(132, 2, 10) == 26 && max_splits_resident(132, 0, 1) == 132 &&
            max_splits_resident(1, 1, 1000) == 1 && max_splits_resident(1 << 20, 8, 1) == kMaxGridY,
        "max_splits_resident");
}

// reconstruct / orthogonalize pass 3: one thread per group over a grid of kThreads-blocks.
void test_reconstruct(std::mt19937& rng) {
  for (int es : {2, 4}) {
    for (int64_t D : {1, 2, 5, 8, 9, 255, 256, 2047, 2049, 4101}) {
      for (int64_t lead : {0, 1, 3, 6}) {
        const int64_t K = 3, ld = D + 5;
        PoisonedBasis P(K, D, ld, lead, rng);
        const uint64_t base = 0x7f0000000000ull + static_cast<uint64_t>(lead * es);
        const ColumnLayout L = make_layout(base, ld, K, D, es);
        std::vector<float> coef = {0.5f, -1.25f, 2.f};
        // Output with 16 guard values on each side.
        std::vector<float> out(static_cast<size_t>(D + 32), -7.f);
        std::vector<int> writes(static_cast<size_t>(D + 32), 0);
        // The persistent grid: block b walks tiles b, b + grid, ... (grid of 3 blocks here).
        const int64_t tiles = ceil_div(num_groups(L), kThreads);
        const int64_t grid = min64(tiles, 3);
        for (int64_t blk = 0; blk < grid; ++blk) {
         for (int64_t tile = blk; tile < tiles; tile += grid) {
          for (int tid = 0; tid < kThreads; ++tid) {
            const int64_t g = tile * kThreads + tid;
            if (g >= num_groups(L)) continue;
            const int64_t col0 = group_col(L, g);
            float acc[8];
            for (int e = 0; e < L.V; ++e) acc[e] = col_valid(L, col0 + e) ? 1.f : 0.f;
            for (int64_t k = 0; k < K; ++k) {
              float v[8];
              load_group_emul(P, k, col0, L, v);
              for (int e = 0; e < L.V; ++e) acc[e] = std::fma(coef[static_cast<size_t>(k)], v[e], acc[e]);
            }
            for (int e = 0; e < L.V; ++e) {
              if (!col_valid(L, col0 + e)) continue;
              out[static_cast<size_t>(16 + col0 + e)] = acc[e];
              ++writes[static_cast<size_t>(16 + col0 + e)];
            }
          }
         }
        }
        for (int64_t j = -16; j < D + 16; ++j) {
          const size_t i = static_cast<size_t>(16 + j);
          if (j < 0 || j >= D) {
            CHECK(writes[i] == 0 && out[i] == -7.f, "write outside [0, D) at %ld", (long)j);
            continue;
          }
          CHECK(writes[i] == 1, "column %ld written %d times", (long)j, writes[i]);
          double ref = 1.0;
          for (int64_t k = 0; k < K; ++k) ref += static_cast<double>(coef[static_cast<size_t>(k)]) * P.at(k, j);
          CHECK(std::fabs(out[i] - ref) <= 1e-5 * (1.0 + std::fabs(ref)), "reconstruct col %ld",
                (long)j);
        }
      }
    }
  }
}

// orthogonalize passes 1 and 2: the pass-1 x tile (strided by kThreads) and the pass-2 residual
// (one group per thread) fill the same TD columns the dot phase reads, each exactly once.
void test_orth_tiles() {
  for (int es : {2, 4}) {
    const int V = vec_elems(es);
    const int TD = orth_tile_cols(V);
    const int U = orth_groups_per_lane(V);
    for (int64_t D : {1, 9, 1023, 1024, 1025, 2048, 4097, 10001}) {
      for (int off = 0; off < kVecBytes; off += es) {
        const ColumnLayout L = make_layout(0x1000u + off, D, 3, D, es);
        const SplitPlan sp = make_split_plan(num_tiles(L, TD), 5);
        std::vector<int> pass1(static_cast<size_t>(D), 0), pass2(static_cast<size_t>(D), 0),
            dot(static_cast<size_t>(D), 0);
        for (int64_t s = 0; s < sp.splits; ++s) {
          for (int64_t t = split_tile_begin(sp, s); t < split_tile_end(sp, s); ++t) {
            const int64_t c0 = tile_col0(L, t, TD);
            for (int tid = 0; tid < kThreads; ++tid) {
              for (int i = tid; i < TD; i += kThreads) {
                if (col_valid(L, c0 + i)) ++pass1[static_cast<size_t>(c0 + i)];
              }
              const int64_t col0 = c0 + static_cast<int64_t>(tid) * V;
              for (int e = 0; e < V; ++e) {
                CHECK(tid * V + e < TD, "residual outside the tile");
                if (col_valid(L, col0 + e)) ++pass2[static_cast<size_t>(col0 + e)];
              }
            }
            for (int lane = 0; lane < kWarp; ++lane) {
              for (int uu = 0; uu < U; ++uu) {
                const int64_t col0 = lane_group_col(c0, uu, lane, V);
                for (int e = 0; e < V; ++e) {
                  if (col_valid(L, col0 + e)) ++dot[static_cast<size_t>(col0 + e)];
                }
              }
            }
          }
        }
        for (int64_t j = 0; j < D; ++j) {
          const size_t i = static_cast<size_t>(j);
          CHECK(pass1[i] == 1 && pass2[i] == 1 && dot[i] == 1, "orth column %ld: %d %d %d",
                (long)j, pass1[i], pass2[i], dot[i]);
        }
      }
    }
  }
}

void test_reduction_order() {
  // Integers: the butterfly sum is exact and must equal the plain sum.
  float lanes[kWarp];
  for (int l = 0; l < kWarp; ++l) lanes[l] = static_cast<float>(l * l - 7 * l);
  float ref = 0.f;
  for (int l = 0; l < kWarp; ++l) ref += lanes[l];
  CHECK(butterfly(lanes) == ref, "butterfly sum");
  // Stage 2 visits every split once, whatever the count.
  for (int64_t splits : {1, 2, 31, 32, 33, 64, 65, 528, 1000}) {
    std::vector<int> seen(static_cast<size_t>(splits), 0);
    for (int lane = 0; lane < kWarp; ++lane) {
      for (int64_t k = stage2_first(lane); k < splits; k += stage2_stride()) ++seen[static_cast<size_t>(k)];
    }
    for (int64_t k = 0; k < splits; ++k) CHECK(seen[static_cast<size_t>(k)] == 1, "split %ld", (long)k);
  }
}

void test_64bit() {
  // 5e9 columns (fp16: 10 GB per row) and 512 rows: offsets pass 2^31 and 2^32.
  const int64_t D = 5000000011LL;
  for (int es : {2, 4}) {
    const ColumnLayout L = make_layout(0x7f0000000006ull, D, 512, D, es);
    const int V = vec_elems(es);
    const int64_t TD = project_tile_cols(V, 1);
    const int64_t tiles = num_tiles(L, TD);
    CHECK(tiles > (int64_t{1} << 21), "tiles %ld", (long)tiles);
    CHECK(tile_col0(L, tiles - 1, TD) < D && tile_col0(L, tiles - 1, TD) + TD >= D, "last tile");
    const SplitPlan sp = make_split_plan(tiles, max_splits_resident(132, 4, 4));
    CHECK(split_tile_end(sp, sp.splits - 1) == tiles, "last split");
    const int64_t last = group_col(L, num_groups(L) - 1);
    CHECK(last < D && last + V >= D && last > (int64_t{1} << 32), "last group %ld", (long)last);
    CHECK(!group_full(L, last) || last + V <= D, "tail group");
    CHECK(partial_index(527, 15, 511, 16, 512) == (527LL * 16 + 15) * 512 + 511, "partial");
    CHECK(ceil_div(num_groups(L), kThreads) < 0x7fffffffLL, "grid.x fits");
  }
}


// ---- int8 basis ----------------------------------------------------------------------------------

void test_int8_dequant() {
  // byte_perm: byte i of the result is byte (s >> 4 i) & 7 of b:a, for every selector nibble.
  std::mt19937 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    const uint32_t a = rng(), b = rng(), sel = rng() & 0x7777u;
    const uint8_t bytes[8] = {
        static_cast<uint8_t>(a), static_cast<uint8_t>(a >> 8), static_cast<uint8_t>(a >> 16),
        static_cast<uint8_t>(a >> 24), static_cast<uint8_t>(b), static_cast<uint8_t>(b >> 8),
        static_cast<uint8_t>(b >> 16), static_cast<uint8_t>(b >> 24)};
    uint32_t expect = 0;
    for (int i = 0; i < 4; ++i) expect |= static_cast<uint32_t>(bytes[(sel >> (4 * i)) & 7u]) << (8 * i);
    CHECK(byte_perm(a, b, sel) == expect, "byte_perm(%08x, %08x, %04x)", a, b, sel);
  }
  // Every int8 value in every byte position, beside three other values: exact, no -0.
  for (int pos = 0; pos < 4; ++pos) {
    for (int q = -128; q <= 127; ++q) {
      const int8_t others[3] = {static_cast<int8_t>(q ^ 0x55), -128, 127};
      int8_t vals[4];
      for (int i = 0, o = 0; i < 4; ++i) vals[i] = i == pos ? static_cast<int8_t>(q) : others[o++];
      uint32_t word = 0;
      for (int i = 0; i < 4; ++i) word |= static_cast<uint32_t>(static_cast<uint8_t>(vals[i])) << (8 * i);
      float v[4];
      int8x4_to_float(word, v);
      for (int i = 0; i < 4; ++i) {
        CHECK(v[i] == static_cast<float>(vals[i]) && !std::signbit(v[i]) == (vals[i] >= 0),
              "int8x4_to_float: byte %d of %08x gave %g, expected %d", i, word, v[i], vals[i]);
      }
    }
  }
  CHECK(kInt8Magic == 8388608.0f + 128.0f && float_from_bits(kInt8MagicBits) == 8388608.0f,
        "magic numbers");
  // The fp64 dequantisation (orthogonalize_): every value in every byte position, exact, no -0.
  for (int pos = 0; pos < 4; ++pos) {
    for (int q = -128; q <= 127; ++q) {
      const int8_t others[3] = {static_cast<int8_t>(q ^ 0x33), 127, -128};
      int8_t vals[4];
      for (int i = 0, o = 0; i < 4; ++i) vals[i] = i == pos ? static_cast<int8_t>(q) : others[o++];
      uint32_t word = 0;
      for (int i = 0; i < 4; ++i) word |= static_cast<uint32_t>(static_cast<uint8_t>(vals[i])) << (8 * i);
      double v[4];
      int8x4_to_double(word, v);
      for (int i = 0; i < 4; ++i) {
        CHECK(v[i] == static_cast<double>(vals[i]) && !std::signbit(v[i]) == (vals[i] >= 0),
              "int8x4_to_double: byte %d of %08x gave %g, expected %d", i, word, v[i], vals[i]);
      }
    }
  }
  CHECK(double_from_words(kInt8MagicHi64, 0u) == 1048576.0 && kInt8Magic64 == 1048576.0 + 128.0,
        "fp64 magic numbers");
}

// orthogonalize_'s quantisation of a stored int8 row against reference.quantise_blocks restated
// plainly: rint (half to even) of u * (127 / amax), NaN -> 0, within [-127, 127]; the scale.
void test_int8_quantise(std::mt19937& rng) {
  CHECK(quant_inv(0.0) == 0.0 && quant_inv(std::nan("")) == 0.0 && quant_inv(-1.0) == 0.0, "inv");
  CHECK(quant_inv(2.0) == 127.0 / 2.0, "inv 2");
  // Ties go to even; the block's largest value takes 127 exactly.
  const double ties[][2] = {{2.5, 2}, {3.5, 4}, {-2.5, -2}, {-3.5, -4}, {0.5, 0}, {-0.5, 0},
                            {126.5, 126}, {127.0, 127}, {-127.0, -127}, {1e300, 127}, {-1e300, -127}};
  for (const auto& t : ties) {
    CHECK(quantise_int8(t[0], 1.0) == static_cast<int8_t>(t[1]), "quantise(%g) gave %d", t[0],
          quantise_int8(t[0], 1.0));
  }
  CHECK(quantise_int8(std::nan(""), 1.0) == 0 && quantise_int8(1.0, std::nan("")) == 0, "NaN -> 0");
  CHECK(quantise_int8(5.0, 0.0) == 0, "a zero block");
  std::uniform_real_distribution<double> real(-1.0, 1.0);
  for (int trial = 0; trial < 2000; ++trial) {
    double u[64], amax = 0.0;
    const double mag = std::ldexp(1.0, trial % 61 - 30);
    for (double& x : u) {
      x = real(rng) * mag;
      amax = std::fmax(amax, std::fabs(x));
    }
    const double inv = quant_inv(amax);
    for (double x : u) {
      const int8_t q = quantise_int8(x, inv);
      const double expect = std::nearbyint(x * (127.0 / amax));  // default rounding: half to even
      CHECK(q == static_cast<int8_t>(expect) && q >= -127 && q <= 127, "u=%.17g amax=%.17g q=%d", x,
            amax, q);
    }
    const double norm = std::fabs(real(rng)) + 0.1;
    CHECK(quant_scale(amax, norm) == static_cast<float>(amax / (127.0 * norm)), "scale");
  }
  CHECK(quant_scale(1.0, 0.0) == 0.0f && quant_scale(1.0, std::nan("")) == 0.0f, "scale of a zero norm");
}

void test_int8_layout() {
  for (int64_t D : {1, 2, 15, 16, 17, 63, 64, 65, 127, 1009, 4099}) {
    for (int off = 0; off < kVecBytes; ++off) {
      for (int64_t extra : {0, 1, 3, 16, 29, 64}) {
        for (int64_t rows : {1, 2, 5}) {
          const int64_t ld = D + extra;
          const uint64_t base = 0x7f0000001000ull + static_cast<uint64_t>(off);
          const ColumnLayout L = make_int8_layout(base, ld, rows, D);
          const bool vec = off == 0 && (rows <= 1 || ld % kVecBytes == 0);
          CHECK(L.vec == vec && L.origin == 0 && L.V == kInt8Group && L.D == D,
                "int8 layout D=%ld off=%d ld=%ld rows=%ld", (long)D, off, (long)ld, (long)rows);
          const int64_t G = num_groups(L);
          CHECK(G == ceil_div(D, kInt8Group), "groups");
          for (int64_t g = 0; g < G; ++g) {
            const int64_t c = group_col(L, g);
            const int64_t last = min64(c + kInt8Group, D) - 1;
            CHECK(c >= 0 && c < D && scale_block(c) == scale_block(last), "group %ld in two blocks",
                  (long)g);
            CHECK(scale_block(c) < scale_blocks(D), "scale block past the row");
            if (!group_full(L, c)) continue;
            for (int64_t r = 0; r < rows; ++r) {
              CHECK((base + static_cast<uint64_t>(r * ld + c)) % kVecBytes == 0, "misaligned int8 load");
            }
          }
        }
      }
    }
  }
  CHECK(scale_blocks(1) == 1 && scale_blocks(64) == 1 && scale_blocks(65) == 2, "scale_blocks");
  CHECK(scale_block(0) == 0 && scale_block(63) == 0 && scale_block(64) == 1, "scale_block");
}

// An int8 basis inside a wider allocation (row stride ld, `lead` bytes before column 0) with
// block scales [K, sld >= blocks] (NaN past the blocks): reads outside [0, D) are counted.
struct Int8Basis {
  std::vector<int8_t> q;
  std::vector<float> s;
  int64_t K, D, ld, sld;
  mutable int64_t bad_reads = 0;
  Int8Basis(int64_t K_, int64_t D_, int64_t ld_, int64_t sld_, std::mt19937& rng)
      : K(K_), D(D_), ld(ld_), sld(sld_) {
    q.resize(static_cast<size_t>(K * ld));
    s.assign(static_cast<size_t>(K * sld), kNaN);
    std::uniform_int_distribution<int> u(-128, 127);
    std::uniform_real_distribution<float> us(0.5f, 2.f);
    for (auto& v : q) v = static_cast<int8_t>(u(rng));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t b = 0; b < scale_blocks(D); ++b) s[static_cast<size_t>(k * sld + b)] = us(rng) / 127.f;
  }
  int8_t at(int64_t k, int64_t j) const { return q[static_cast<size_t>(k * ld + j)]; }
  double value(int64_t k, int64_t j) const {
    return static_cast<double>(at(k, j)) * s[static_cast<size_t>(k * sld + scale_block(j))];
  }
  // The 16 bytes of a group as the kernels get them: a 16-byte load (every column must be in
  // the row) or masked byte loads (0 outside [0, D)); little-endian words.
  void group(int64_t k, int64_t col0, const ColumnLayout& L, uint32_t w[4]) const {
    const bool full = group_full(L, col0);
    for (int i = 0; i < 4; ++i) w[i] = 0;
    for (int e = 0; e < kInt8Group; ++e) {
      const int64_t c = col0 + e;
      if (!col_valid(L, c)) {
        if (full) ++bad_reads;
        continue;
      }
      w[e / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(at(k, c))) << (8 * (e % 4));
    }
  }
  float scale(int64_t k, int64_t col0) const {
    if (col0 >= D) return 0.f;
    const int64_t b = scale_block(col0);
    if (b >= scale_blocks(D)) ++bad_reads;
    return s[static_cast<size_t>(k * sld + b)];
  }
};

// project over an int8 basis: the kernel's walk (balanced K tiles of project_int8_rows_per_block,
// splits, per lane the masked head, masked tail, full steps; per group the dot product of its 16
// dequantised values, then sum = fma(scale, dot, sum); butterfly; stage 2) in passes of
// kProjectInt8Batch, against fp64.
void test_project_int8(std::mt19937& rng) {
  struct Case {
    int64_t K, D, extra;
    int off, B, blocks_per_sm, sms;
  };
  const Case cases[] = {
      {1, 1, 0, 0, 1, 2, 132},    {3, 1, 15, 0, 2, 2, 132},   {1, 7, 0, 3, 1, 2, 132},
      {3, 1009, 15, 0, 1, 1, 7},  {3, 1009, 15, 0, 5, 2, 3},  {37, 1000, 24, 0, 2, 2, 5},
      {301, 37, 27, 0, 1, 2, 132}, {5, 4099, 13, 0, 3, 1, 2}, {19, 4099, 13, 0, 16, 2, 3},
      {3, 2053, 11, 5, 1, 2, 4},  {2, 10007, 9, 0, 1, 1, 1},  {33, 2048, 0, 0, 4, 2, 2},
  };
  for (const Case& c : cases) {
    const int64_t ld = c.D + c.extra;
    const int64_t sld = scale_blocks(c.D) + 3;
    Int8Basis P(c.K, c.D, ld, sld, rng);
    std::vector<float> x(static_cast<size_t>(c.B * c.D));
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto& v : x) v = u(rng);
    const uint64_t base = 0x7f0000000000ull + static_cast<uint64_t>(c.off);
    const ColumnLayout L = make_int8_layout(base, ld, c.K, c.D);
    std::vector<float> got(static_cast<size_t>(c.B * c.K), kNaN);
    for (int64_t p0 = 0; p0 < c.B; p0 += kProjectInt8Batch) {
      const int nb = static_cast<int>(min64(kProjectInt8Batch, c.B - p0));
      const int bmax = batch_tile(nb);
      CHECK(bmax <= kProjectInt8Batch, "int8 batch tile %d", bmax);
      const int RW = project_int8_rows_per_warp(bmax);
      const int G = project_int8_groups_per_step(bmax);
      const int TD = project_int8_step_cols(bmax);
      CHECK(RW * G >= 4 && TD == kWarp * G * kInt8Group, "int8 step RW=%d G=%d", RW, G);
      const int64_t k_tiles = ceil_div(c.K, project_int8_rows_per_block(bmax));
      const SplitPlan sp =
          make_split_plan(num_tiles(L, TD), max_splits_resident(c.sms, c.blocks_per_sm, k_tiles));
      const int64_t ft0 = full_tile_begin(L), ft1 = full_tile_end(L, TD);
      std::vector<float> partial(static_cast<size_t>(sp.splits * nb * c.K), kNaN);
      std::vector<int> seen(static_cast<size_t>(c.D), 0);
      for (int64_t kt = 0; kt < k_tiles; ++kt) {
        const int64_t row0 = balanced_begin(c.K, k_tiles, kt);
        const int rows = static_cast<int>(balanced_begin(c.K, k_tiles, kt + 1) - row0);
        CHECK(rows >= 1 && rows <= kWarps * RW, "int8 rows %d", rows);
        for (int64_t s = 0; s < sp.splits; ++s) {
          const int64_t t0 = split_tile_begin(sp, s), t1 = split_tile_end(sp, s);
          const int64_t f_end = min64(t1, ft1);
          const int64_t f_begin = min64(t1, max64(t0, ft0));
          std::vector<int64_t> order;
          for (int64_t t = t0; t < f_begin; ++t) order.push_back(t);
          for (int64_t t = max64(f_begin, f_end); t < t1; ++t) order.push_back(t);
          for (int64_t t = f_begin; t < f_end; ++t) {
            bool all = true;
            for (int g = 0; g < TD / kInt8Group; ++g) all = all && group_full(L, tile_col0(L, t, TD) + g * kInt8Group);
            CHECK(all, "int8 hot-loop step %ld has a partial group", (long)t);
            order.push_back(t);
          }
          for (int warp = 0; warp < kWarps; ++warp) {
            for (int i = 0; i < RW; ++i) {
              const int r = warp + i * kWarps;
              if (r >= rows) continue;
              for (int b = 0; b < nb; ++b) {
                float lanes[kWarp];
                for (int lane = 0; lane < kWarp; ++lane) {
                  float acc = 0.f;
                  for (int64_t t : order) {
                    for (int uu = 0; uu < G; ++uu) {
                      const int64_t col0 = lane_group_col(tile_col0(L, t, TD), uu, lane, kInt8Group);
                      uint32_t w[4];
                      P.group(row0 + r, col0, L, w);
                      float dot = 0.f;
                      for (int qq = 0; qq < 4; ++qq) {
                        float v[4];
                        int8x4_to_float(w[qq], v);
                        for (int e = 0; e < 4; ++e) {
                          const int64_t col = col0 + 4 * qq + e;
                          const float xv = col_valid(L, col) ? x[static_cast<size_t>((p0 + b) * c.D + col)] : 0.f;
                          dot = std::fma(v[e], xv, dot);
                          if (kt == 0 && r == 0 && b == 0 && col_valid(L, col)) ++seen[static_cast<size_t>(col)];
                        }
                      }
                      acc = std::fma(P.scale(row0 + r, col0), dot, acc);
                    }
                  }
                  lanes[lane] = acc;
                }
                const int64_t idx = partial_index(s, b, row0 + r, nb, c.K);
                CHECK(std::isnan(partial[static_cast<size_t>(idx)]), "int8 partial written twice");
                partial[static_cast<size_t>(idx)] = butterfly(lanes);
              }
            }
          }
        }
      }
      for (int64_t j = 0; j < c.D; ++j) {
        CHECK(seen[static_cast<size_t>(j)] == 1, "int8 column %ld visited %d times (D=%ld)", (long)j,
              seen[static_cast<size_t>(j)], (long)c.D);
      }
      const int64_t n = nb * c.K;
      for (int64_t i = 0; i < n; ++i) {
        float lanes[kWarp];
        for (int lane = 0; lane < kWarp; ++lane) {
          float sum = 0.f;
          for (int64_t k = stage2_first(lane); k < sp.splits; k += stage2_stride()) sum += partial[static_cast<size_t>(k * n + i)];
          lanes[lane] = sum;
        }
        got[static_cast<size_t>(p0 * c.K + i)] = butterfly(lanes);
      }
    }
    CHECK(P.bad_reads == 0, "int8 project: %ld reads outside the row or its scales", (long)P.bad_reads);
    double worst = 0.0;
    for (int64_t i = 0; i < c.B * c.K; ++i) {
      const int64_t b = i / c.K, k = i % c.K;
      double ref = 0.0, mag = 0.0;
      for (int64_t j = 0; j < c.D; ++j) {
        const double t = P.value(k, j) * x[static_cast<size_t>(b * c.D + j)];
        ref += t;
        mag += std::fabs(t);
      }
      const double err = std::fabs(got[static_cast<size_t>(i)] - ref) / (mag + 1e-30);
      worst = err > worst || std::isnan(err) ? err : worst;
    }
    CHECK(worst < 1e-5, "int8 project K=%ld D=%ld B=%d off=%d: relative error %g", (long)c.K,
          (long)c.D, c.B, c.off, worst);
  }
}

// reconstruct over an int8 basis: one thread per 16-column group (full: 16-byte loads), rows in
// order, coefficient alpha[k] * the group's block scale; every column written once.
void test_reconstruct_int8(std::mt19937& rng) {
  for (int64_t K : {1, 3, 37}) {
    for (int64_t D : {1, 7, 16, 63, 64, 65, 1009, 4099}) {
      for (int off : {0, 5}) {
        const int64_t ld = D + 13 + (off == 0 ? 3 : 0);  // a multiple of 16 past D + 13 or not
        const int64_t sld = scale_blocks(D) + 1;
        Int8Basis P(K, D, ld, sld, rng);
        const ColumnLayout L = make_int8_layout(0x7f0000000000ull + static_cast<uint64_t>(off), ld, K, D);
        std::vector<float> alpha(static_cast<size_t>(K));
        std::uniform_real_distribution<float> u(-1.f, 1.f);
        for (auto& a : alpha) a = u(rng);
        std::vector<float> out(static_cast<size_t>(D + 32), -7.f);
        std::vector<int> writes(static_cast<size_t>(D + 32), 0);
        for (int64_t g = 0; g < num_groups(L); ++g) {
          const int64_t col0 = group_col(L, g);
          float acc[kInt8Group];
          for (int e = 0; e < kInt8Group; ++e) acc[e] = col_valid(L, col0 + e) ? 0.25f : 0.f;
          for (int64_t k = 0; k < K; ++k) {
            uint32_t w[4];
            P.group(k, col0, L, w);
            const float cf = alpha[static_cast<size_t>(k)] * P.scale(k, col0);
            for (int qq = 0; qq < 4; ++qq) {
              float v[4];
              int8x4_to_float(w[qq], v);
              for (int e = 0; e < 4; ++e) acc[4 * qq + e] = std::fma(cf, v[e], acc[4 * qq + e]);
            }
          }
          for (int e = 0; e < kInt8Group; ++e) {
            if (!col_valid(L, col0 + e)) continue;
            out[static_cast<size_t>(16 + col0 + e)] = acc[e];
            ++writes[static_cast<size_t>(16 + col0 + e)];
          }
        }
        CHECK(P.bad_reads == 0, "int8 reconstruct reads outside the row");
        for (int64_t j = -16; j < D + 16; ++j) {
          const size_t i = static_cast<size_t>(16 + j);
          if (j < 0 || j >= D) {
            CHECK(writes[i] == 0 && out[i] == -7.f, "int8 write outside [0, D) at %ld", (long)j);
            continue;
          }
          CHECK(writes[i] == 1, "int8 column %ld written %d times", (long)j, writes[i]);
          double ref = 0.25, mag = 0.25;
          for (int64_t k = 0; k < K; ++k) {
            ref += alpha[static_cast<size_t>(k)] * P.value(k, j);
            mag += std::fabs(alpha[static_cast<size_t>(k)] * P.value(k, j));
          }
          CHECK(std::fabs(out[i] - ref) <= 1e-5 * mag, "int8 reconstruct K=%ld D=%ld col %ld",
                (long)K, (long)D, (long)j);
        }
      }
    }
  }
  // 64-bit columns: a row of 5e9 int8 values; its groups, tiles and scale blocks past 2^32.
  const int64_t D = 5000000011LL;
  const ColumnLayout L = make_int8_layout(0x7f0000000000ull, ceil_div(D, 64) * 64, 512, D);
  const int64_t last = group_col(L, num_groups(L) - 1);
  CHECK(L.vec && last < D && last + kInt8Group >= D && last > (int64_t{1} << 32), "int8 last group");
  CHECK(scale_block(last) == last / kQuantBlock && scale_block(last) < scale_blocks(D) &&
            scale_blocks(D) == 78125001LL,
        "int8 scale block %ld", (long)scale_block(last));
  const int64_t TD = project_int8_step_cols(1);
  CHECK(tile_col0(L, num_tiles(L, TD) - 1, TD) < D && num_tiles(L, TD) > (int64_t{1} << 22), "int8 tiles");
}
}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_layout();
  test_small_helpers();
  test_split_plan();
  test_project(rng);
  test_reconstruct(rng);
  test_orth_tiles();
  test_reduction_order();
  test_64bit();
  test_int8_dequant();
  test_int8_layout();
  test_project_int8(rng);
  test_reconstruct_int8(rng);
  test_int8_quantise(rng);
  return twa_check::summary("host_test");
}
