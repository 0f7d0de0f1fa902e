// CPU test of the fused step's split of table blocks over warps and blocks of threads
// (csrc/twa_step.h), built by nvcc as a host program and run without a GPU: every block is
// taken by exactly one warp, in contiguous ranges, within the grid the plan asks for, and the
// projection's grid respects the y-dimension limit and covers every basis row.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../twa_step.h"

using namespace twa::step;

namespace {

int failures = 0;
int checks = 0;

#define CHECK(cond, ...)                                           \
  do {                                                             \
    ++checks;                                                      \
    if (!(cond)) {                                                 \
      ++failures;                                                  \
      std::printf("FAIL %s:%d: %s | ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                    \
      std::printf("\n");                                           \
      if (failures > 25) std::exit(1);                             \
    }                                                              \
  } while (0)

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

  std::printf("step_host_test: %d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
