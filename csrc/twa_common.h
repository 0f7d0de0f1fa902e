// Index, tiling, masking and reduction-order helpers shared by the kernels, the torch glue and
// the host test (csrc/tests/host_test.cu). Plain C++ when not compiled by nvcc, so the glue
// (g++) and a CPU-only test program use exactly the arithmetic the kernels use.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TWA_HD __host__ __device__ __forceinline__
#else
#define TWA_HD inline
#endif

namespace twa {

constexpr int kWarp = 32;
// One 16-byte load per group: 8 fp16/bf16 or 4 fp32 basis values.
constexpr int kVecBytes = 16;
// 256 threads = 8 warps: enough loads in flight per SM at 4-8 resident blocks, and small
// enough that a block's shared tiles (<= 40 KiB in project) leave room for 5 blocks on an SM.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
// project: basis rows per block. 128 rows x 16 batch columns x 4 B = 8 KiB of accumulators.
constexpr int kRowsPerTile = 128;
// project: batch rows per launch; larger batches are cut into launches of 16.
constexpr int kMaxBatch = 16;
// project: fp32 x tile budget in elements (x tile = BMAX x TD floats = 32 KiB).
constexpr int kXTileElems = 8192;
// project: at most 8 16-byte loads in flight per lane and row (32 registers); 16 (fp32 rows,
// B = 1) made ptxas spill 16 bytes on sm_90.
constexpr int kMaxGroupsPerLane = 8;
// Blocks per SM that reconstruct_kernel and project_stage1 are compiled for (__launch_bounds__
// minimum; .ci/cuda_sass.py checks that their registers and shared memory fit). Their grids are
// sized from the resident blocks per SM that the CUDA runtime reports for the compiled kernel
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor, cached), this value being the fallback when
// the query fails. 2 blocks of 8 warps with 8 16-byte loads in flight per lane keep 64 KiB in
// flight per SM, about three times what HBM3e needs; project's RW x BMAX register sums need
// the 128 registers that 2 blocks allow.
constexpr int kStreamMinBlocks = 4;
// reconstruct_int8_kernel: 3 (80 registers). Its 16 fp32 sums per thread (16 int8 values per
// 16-byte group) beside the 8 loads in flight and their scales spilled 24 bytes at 64 registers
// (4 blocks); 3 blocks of 8 loads in flight keep 96 KiB in flight per SM.
constexpr int kInt8StreamMinBlocks = 3;
constexpr int kProjectMinBlocks = 2;
// 16-byte basis loads issued together before any is consumed, per thread and hot-loop step.
constexpr int kLoadsInFlight = 8;
// Values of an int8 basis per 16-byte group.
constexpr int kInt8Group = 16;
// CUDA's grid.y limit bounds the number of splits.
constexpr int64_t kMaxGridY = 65535;
// orthogonalize_ keeps one fp64 accumulator per basis row in shared memory (with the fp64 x
// tile of at most 16 KiB): 2048 rows = 16 KiB, inside the 48 KiB default.
constexpr int kMaxOrthRank = 2048;
// orthogonalize_ stores rows scaled so their largest entry is ROW_AMAX (reference.ROW_AMAX).
constexpr double kRowAmax = 4096.0;

TWA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
TWA_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
TWA_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Elements per 16-byte group.
TWA_HD constexpr int vec_elems(int elem_size) { return kVecBytes / elem_size; }

// project: groups per lane per row and tile, so that the x tile (BMAX x TD fp32) fits in
// kXTileElems. TD = kWarp * U * V: 2048 fp16 or 1024 fp32 columns for B <= 4.
TWA_HD constexpr int project_groups_per_lane(int V, int bmax) {
  return kMaxGroupsPerLane < kXTileElems / (bmax * kWarp * V)
             ? kMaxGroupsPerLane
             : kXTileElems / (bmax * kWarp * V);
}
TWA_HD constexpr int project_tile_cols(int V, int bmax) {
  return kWarp * project_groups_per_lane(V, bmax) * V;
}
// orthogonalize_: one group per thread in the residual phase, so TD = kThreads * V
// (2048 fp16/bf16 or 1024 fp32 columns; an fp64 tile of at most 16 KiB).
TWA_HD constexpr int orth_tile_cols(int V) { return kThreads * V; }
TWA_HD constexpr int orth_groups_per_lane(int V) { return orth_tile_cols(V) / (kWarp * V); }

// project (split-K GEMV): warp w of a block owns RW = project_rows_per_warp(bmax) basis rows
// (w, w + kWarps, ...) and keeps RW x bmax fp32 sums per lane in registers over the block's
// whole column range; each step loads G = project_groups_per_step(bmax) 16-byte groups of each
// of its rows before consuming them: RW x G = 8 loads at bmax <= 2, 4 at bmax = 4. Batches
// of more than kProjectBatch rows run in passes of kProjectBatch: at bmax 8 and 16 the x
// values of a step did not fit 128 (or 255) registers without spilling.
constexpr int kProjectBatch = 4;
TWA_HD constexpr int project_rows_per_warp(int bmax) { return bmax <= 2 ? 4 : 2; }
TWA_HD constexpr int project_groups_per_step(int /* bmax */) { return 2; }
TWA_HD constexpr int project_rows_per_block(int bmax) { return kWarps * project_rows_per_warp(bmax); }
// Columns of one step (the column tile of the split): kWarp lanes x G groups x V.
TWA_HD constexpr int project_step_cols(int V, int bmax) {
  return kWarp * project_groups_per_step(bmax) * V;
}

// project over an int8 basis (V = 16 values per 16-byte group): the same walk, with RW x G = 8
// loads per step at bmax = 1 (RW 4, G 2) and 4 at bmax = 2 (RW 2, G 2), and batches in passes
// of kProjectInt8Batch = 2 rows (the same basis bytes per x row as fp16 in passes of 4). The
// int8 step keeps each group's dot product apart until its block scale is applied, and the 16
// x values of a group per batch row: at bmax 2 with RW 4 (or bmax 4) ptxas spilled on sm_90.
constexpr int kProjectInt8Batch = 2;
TWA_HD constexpr int project_int8_rows_per_warp(int bmax) { return bmax <= 1 ? 4 : 2; }
TWA_HD constexpr int project_int8_groups_per_step(int /* bmax */) { return 2; }
TWA_HD constexpr int project_int8_rows_per_block(int bmax) {
  return kWarps * project_int8_rows_per_warp(bmax);
}
TWA_HD constexpr int project_int8_step_cols(int bmax) {
  return kWarp * project_int8_groups_per_step(bmax) * kInt8Group;
}

// Part i of n items cut into `parts` contiguous parts whose sizes differ by at most one
// (301 rows in 3 parts: 100, 100, 101).
TWA_HD int64_t balanced_begin(int64_t n, int64_t parts, int64_t i) { return i * n / parts; }

// Smallest supported batch tile (1, 2, 4, 8, 16) holding B rows.
TWA_HD int batch_tile(int64_t B) {
  int b = 1;
  while (b < B && b < kMaxBatch) b *= 2;
  return b;
}

// Columns are visited in groups of V consecutive columns starting at `origin`: group g covers
// [origin + g V, origin + (g + 1) V). With 16-byte loads allowed, origin is chosen so every
// group that lies inside [0, D) starts on a 16-byte boundary in every row; the first and last
// groups may stick out of [0, D) (origin in (-V, 0]) and take the masked scalar path.
struct ColumnLayout {
  int64_t D;
  int64_t origin;
  int V;
  bool vec;
};

// base_addr: address of basis[0, 0]; ld: elements between rows; rows: rows that are read.
// Rows share an alignment phase only when ld * elem_size is a multiple of 16 (a column slice
// of an fp16 basis with an odd width does not), otherwise every load is a scalar load.
TWA_HD ColumnLayout make_layout(uint64_t base_addr, int64_t ld, int64_t rows, int64_t D,
                                int elem_size) {
  ColumnLayout L;
  L.D = D;
  L.V = vec_elems(elem_size);
  L.vec = false;
  L.origin = 0;
  if (base_addr % static_cast<uint64_t>(elem_size) != 0) return L;
  if (rows > 1 && (ld * elem_size) % kVecBytes != 0) return L;
  const int64_t head =
      static_cast<int64_t>((kVecBytes - base_addr % kVecBytes) % kVecBytes) / elem_size;
  L.vec = true;
  L.origin = head == 0 ? 0 : head - L.V;
  return L;
}

TWA_HD int64_t num_groups(const ColumnLayout& L) { return ceil_div(L.D - L.origin, L.V); }
TWA_HD int64_t group_col(const ColumnLayout& L, int64_t g) { return L.origin + g * L.V; }
// The whole group is inside [0, D) and may be read with one 16-byte load.
TWA_HD bool group_full(const ColumnLayout& L, int64_t col0) {
  return L.vec && col0 >= 0 && col0 + L.V <= L.D;
}
// Tail/head mask of the scalar path.
TWA_HD bool col_valid(const ColumnLayout& L, int64_t col) { return col >= 0 && col < L.D; }

// Column tiles of TD columns (TD a multiple of V): tile t starts at origin + t TD.
TWA_HD int64_t num_tiles(const ColumnLayout& L, int64_t TD) { return ceil_div(L.D - L.origin, TD); }
TWA_HD int64_t tile_col0(const ColumnLayout& L, int64_t tile, int64_t TD) {
  return L.origin + tile * TD;
}
// The tiles made only of full groups (16-byte loads, no mask) are [full_tile_begin,
// full_tile_end): tile 0 is partial when the layout starts before column 0, the tiles that reach
// past D - 1 are partial, and without 16-byte loads no tile is full.
TWA_HD int64_t full_tile_begin(const ColumnLayout& L) { return L.origin < 0 ? 1 : 0; }
TWA_HD int64_t full_tile_end(const ColumnLayout& L, int64_t TD) {
  return L.vec ? max64(full_tile_begin(L), (L.D - L.origin) / TD) : full_tile_begin(L);
}
TWA_HD bool tile_full(const ColumnLayout& L, int64_t tile, int64_t TD) {
  return tile >= full_tile_begin(L) && tile < full_tile_end(L, TD);
}
// Group u of a lane inside a tile: lanes take consecutive groups, so one warp-wide 16-byte
// load reads 512 contiguous bytes of a row.
TWA_HD int lane_group(int u, int lane) { return u * kWarp + lane; }
TWA_HD int64_t lane_group_col(int64_t c0, int u, int lane, int V) {
  return c0 + static_cast<int64_t>(lane_group(u, lane)) * V;
}

// ---- int8 basis (one fp32 scale per kQuantBlock values of a row) ----------------------------
//
// value(k, j) = basis[k, j] * scales[k * scales_ld + j / kQuantBlock] (twa_kernels._layout).
// The int8 kernels read groups of V = 16 values (one 16-byte load) that start at multiples of 16
// columns (origin 0), so a group lies inside one scale block and takes one scale: the scale is
// read once per 16 values. Rows read with 16-byte loads must therefore start 16-byte aligned:
// when row 0 does not (a column slice at an odd offset) or the rows do not share the phase,
// every group takes the masked path (still one scale per group).
constexpr int kQuantBlock = 64;

TWA_HD ColumnLayout make_int8_layout(uint64_t base_addr, int64_t ld, int64_t rows, int64_t D) {
  ColumnLayout L = make_layout(base_addr, ld, rows, D, 1);
  if (L.origin != 0) {
    L.vec = false;
    L.origin = 0;
  }
  return L;
}
// Scales per row (ceil(D / 64)) and the scale block of a column (col >= 0).
TWA_HD int64_t scale_blocks(int64_t D) { return ceil_div(D, kQuantBlock); }
TWA_HD int64_t scale_block(int64_t col) {
  return static_cast<int64_t>(static_cast<uint64_t>(col) / kQuantBlock);
}

// Byte permute, the PTX prmt.b32 of __byte_perm: byte i of the result is byte (s >> 4 i) & 7 of
// the 8-byte value b:a (a holds bytes 0-3). The host version is the same function, for tests.
TWA_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, s);
#else
  const uint64_t v = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t sel = (s >> (4 * i)) & 7u;
    r |= static_cast<uint32_t>((v >> (8 * sel)) & 0xffu) << (8 * i);
  }
  return r;
#endif
}

TWA_HD float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// int8 -> fp32 without a conversion instruction (I2F is quarter rate on sm_80/sm_90): flip the
// sign bits (q + 128 in [0, 255]), put each byte under the exponent of 2^23 with a byte permute
// (the float 2^23 + q + 128, exactly) and subtract 2^23 + 128 (exact). One LOP3 per 4 values,
// one PRMT and one FADD per value, all full rate; the same trick as the Triton kernels'
// _common.int8_to_float.
constexpr uint32_t kInt8SignFlip = 0x80808080u;
constexpr uint32_t kInt8MagicBits = 0x4B000000u;  // 2^23
constexpr float kInt8Magic = 8388736.0f;          // 2^23 + 128
// Selector of byte i: byte i of the flipped word, then 0x00, 0x00, 0x4B.
TWA_HD constexpr uint32_t int8_selector(int i) { return 0x7440u + static_cast<uint32_t>(i); }

// The 4 int8 values of a 32-bit word (value i in byte i, little endian) as exact fp32.
TWA_HD void int8x4_to_float(uint32_t word, float v[4]) {
  const uint32_t t = word ^ kInt8SignFlip;
  for (int i = 0; i < 4; ++i) {
    v[i] = float_from_bits(byte_perm(t, kInt8MagicBits, int8_selector(i))) - kInt8Magic;
  }
}

// The same in fp64 (orthogonalize_'s dot products and residuals), without a conversion
// instruction either (F2F.F64.F32 runs at 16 per clock and SM on sm_90): the flipped byte is put
// under the exponent of 2^20 in the high word of a double, with a byte permute (the double
// 2^20 + q + 128, exactly: the byte lands on mantissa bits 32-39, whose unit is 2^0), and
// 2^20 + 128 is subtracted (exact). One PRMT and one DADD per value.
constexpr uint32_t kInt8MagicHi64 = 0x41300000u;  // high word of 2^20
constexpr double kInt8Magic64 = 1048704.0;        // 2^20 + 128
// Selector of byte i: byte i of the flipped word, then bytes 1-3 of 2^20's high word.
TWA_HD constexpr uint32_t int8_selector64(int i) { return 0x7650u + static_cast<uint32_t>(i); }

TWA_HD double double_from_words(uint32_t hi, uint32_t lo) {
#if defined(__CUDA_ARCH__)
  return __hiloint2double(static_cast<int>(hi), static_cast<int>(lo));
#else
  const uint64_t u = (static_cast<uint64_t>(hi) << 32) | lo;
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
#endif
}

TWA_HD void int8x4_to_double(uint32_t word, double v[4]) {
  const uint32_t t = word ^ kInt8SignFlip;
  for (int i = 0; i < 4; ++i) {
    v[i] = double_from_words(byte_perm(t, kInt8MagicHi64, int8_selector64(i)), 0u) - kInt8Magic64;
  }
}

// orthogonalize_ stores a row of an int8 basis quantised per scale block b (reference.
// quantise_blocks): q = rint(u * (QMAX / amax_b)) (QMAX / amax_b formed first; half to even),
// 0 for NaN, within [-QMAX, QMAX]; a block whose amax is not > 0 (zeros, NaN) stores zeros.
constexpr int kQMax = 127;
TWA_HD double quant_inv(double amax) { return amax > 0.0 ? kQMax / amax : 0.0; }
TWA_HD int8_t quantise_int8(double u, double inv) {
  double t = rint(u * inv);
  if (!(t == t)) t = 0.0;
  t = t < -kQMax ? -kQMax : (t > kQMax ? kQMax : t);
  return static_cast<int8_t>(static_cast<int>(t));
}
// The block's scale: amax_b / (QMAX ||u||), 0 unless ||u|| > 0, rounded once to fp32.
TWA_HD float quant_scale(double amax, double norm) {
  return static_cast<float>(norm > 0.0 ? amax / (kQMax * norm) : 0.0);
}

// Split of the tiles over D into contiguous ranges, one per block (first stage).
struct SplitPlan {
  int64_t tiles;
  int64_t tiles_per_split;
  int64_t splits;
};

TWA_HD SplitPlan make_split_plan(int64_t tiles, int64_t max_splits) {
  SplitPlan p;
  p.tiles = tiles;
  int64_t s = min64(tiles, max64(max_splits, 1));
  s = max64(s, 1);
  p.tiles_per_split = ceil_div(tiles, s);
  p.splits = ceil_div(tiles, p.tiles_per_split);  // no empty split
  return p;
}
TWA_HD int64_t split_tile_begin(const SplitPlan& p, int64_t split) {
  return split * p.tiles_per_split;
}
TWA_HD int64_t split_tile_end(const SplitPlan& p, int64_t split) {
  return min64(p.tiles, (split + 1) * p.tiles_per_split);
}
// Splits over D for a grid of `other_blocks` blocks per split (project: K tiles) that fills
// every SM with its resident blocks once: at most blocks_per_sm x sm_count blocks in all.
TWA_HD int64_t max_splits_resident(int64_t sm_count, int64_t blocks_per_sm, int64_t other_blocks) {
  return min64(kMaxGridY, max64(1, (max64(blocks_per_sm, 1) * sm_count) / max64(other_blocks, 1)));
}

// First-stage partials: [split][row of the batch][basis row], written by exactly one block.
TWA_HD int64_t partial_index(int64_t split, int64_t b, int64_t k, int64_t B, int64_t K) {
  return (split * B + b) * K + k;
}

// Reduction order. A warp sum is an xor butterfly: after step `offset` (16, 8, 4, 2, 1) lane l
// holds v[l] + v[l ^ offset]; every lane ends with the same bits. Second stage: lane l sums
// splits l, l + 32, ... in increasing order, then the butterfly. Both orders depend only on the
// sizes, so the same inputs give the same bits.
TWA_HD int xor_partner(int lane, int offset) { return lane ^ offset; }
TWA_HD int64_t stage2_first(int lane) { return lane; }
TWA_HD int64_t stage2_stride() { return kWarp; }

// NaN-propagating max (torch.maximum semantics), used for max|v1| in orthogonalize_.
TWA_HD double nan_max(double a, double b) { return (a != a || a > b) ? a : b; }
// Clamp that keeps NaN (torch.clamp semantics).
TWA_HD double clamp_keep_nan(double v, double limit) {
  return v > limit ? limit : (v < -limit ? -limit : v);
}

// orthogonalize_ workspace (fp64), laid out once for every pass:
//   [0, r]            pass-1 sums: raw P^T v (r values), ||v||^2
//   [r+1, 2r+1)       c1 = s * raw
//   [2r+1, 3r+1)      -(s * c1): coefficients of the pass-2 residual v1 = v - P c1
//   [3r+1, 4r+3)      pass-2 sums: raw P^T v1 (r values), ||v1||^2, max|v1|
//   [4r+3, 5r+3)      -(s * h): coefficients of the stored remainder u = v - P h
//   [5r+3]            ROW_AMAX / max|v1| (0 for a zero remainder)
// For a basis sharded along D, [sums1, sums1 + r] (sum) after phase 1 and [sums2, sums2 + r]
// (sum), [sums2 + r + 1] (max) after phase 2 are combined across shards (twa_launch.h).
// The per-split partials of the current pass follow at size().
struct OrthWorkspace {
  int64_t r;
  TWA_HD int64_t sums1() const { return 0; }
  TWA_HD int64_t c1() const { return r + 1; }
  TWA_HD int64_t coef1() const { return 2 * r + 1; }
  TWA_HD int64_t sums2() const { return 3 * r + 1; }
  TWA_HD int64_t coef2() const { return 4 * r + 3; }
  TWA_HD int64_t inv() const { return 5 * r + 3; }
  TWA_HD int64_t size() const { return 5 * r + 4; }
};

}  // namespace twa
