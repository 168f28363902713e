// A persistent LSTM sequence kernel for CPUs, called from JAX through XLA's FFI.
//
// It computes exactly the two loops of lstm_jax/fused.py (same inputs, same saved
// activations, same gradients), but keeps each core's slice of the weights packed and
// resident in its cache for the whole sequence, and fuses the gate nonlinearities and
// the cell update into the step, as oneDNN's and cuDNN's persistent RNN kernels do
// (Appleyard, Kocisky & Blunsom 2016). XLA's CPU backend cannot express that: it
// launches every step's matmul and elementwise ops as separate kernels.
//
// Work split: thread t owns a contiguous block of hidden units and computes all four
// gates, the cell state and h of those units, for every batch row. A step's matmul
// therefore needs only the thread's own columns of [W_x; W_h] (forward) or rows of
// W_h (backward), which stay in its core's cache. Threads meet at one barrier per
// step, where the new h (forward) or dz (backward) becomes visible to all.
// Every output element is summed in the same order whatever the thread count, so the
// results do not depend on it.
//
// Gates are in the order i, f, g, o. Shapes: T steps, N rows, E inputs, H units.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sched.h>
#ifdef __linux__
#include <sys/mman.h>
#endif
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <utility>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif
// bfloat16 products (the `bf16` attribute) run on AMX's tile units where the CPU has them (Intel since
// Sapphire Rapids): about 14x the float32 FMA rate of a core. -DLSTM_JAX_NO_AMX builds without them.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__) && !defined(LSTM_JAX_NO_AMX)
#define LSTM_JAX_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Vectors of 16 floats where the CPU has AVX-512, else of 8 (AVX2; two 128-bit registers on NEON).
#ifndef LSTM_JAX_LANES
#ifdef __AVX512F__
#define LSTM_JAX_LANES 16
#else
#define LSTM_JAX_LANES 8
#endif
#endif
constexpr int64_t kLanes = LSTM_JAX_LANES;
using vfloat = float __attribute__((vector_size(4 * kLanes)));
using vint = int32_t __attribute__((vector_size(4 * kLanes)));
// A register tile: kTileRows rows of kVectors vectors, one accumulator register each. AVX-512's 32 registers hold
// 8 rows of 2 (16 accumulators); AVX2's 16 hold 6 rows of 2 (12). Neither choice changes any result's bits: each
// element of C is summed over k in the same order whatever the tile.
#ifndef LSTM_JAX_TILE_ROWS
#if LSTM_JAX_LANES == 16
#define LSTM_JAX_TILE_ROWS 8
#else
#define LSTM_JAX_TILE_ROWS 6
#endif
#endif
constexpr int64_t kTileRows = LSTM_JAX_TILE_ROWS;
#ifndef LSTM_JAX_PANEL_VECTORS
#define LSTM_JAX_PANEL_VECTORS 2
#endif
constexpr int64_t kVectors = LSTM_JAX_PANEL_VECTORS;
constexpr int64_t kPanel = kVectors * kLanes;  // columns of a register tile and of a packed panel

// The kernel's own buffers start on a 64-byte cache line. A load that straddles two lines costs two, and
// std::vector's memory is only 16-byte aligned (glibc's large blocks start 16 bytes past a line), so 16-float
// panel loads and AMX tile rows straddled (with the buffers on lines, the float32 calls took 3-9 % less time and
// the bfloat16 calls 20-37 % less).
template <typename T>
struct LineAligned {
  using value_type = T;
  static constexpr std::align_val_t kLine{64};
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kLine)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kLine); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};
template <typename T>
using Scratch = std::vector<T, LineAligned<T>>;

// A vector of copies of a, written as {a, a, ...}: the one form that compiles to a single broadcast
// (vfloat{} + a costs an add, since 0 + a is not a for a = -0, and a loop over the lanes, inserts).
template <size_t... Lane>
inline vfloat splat_lanes(float a, std::index_sequence<Lane...>) {
  return vfloat{((void)Lane, a)...};
}
inline vfloat splat(float a) { return splat_lanes(a, std::make_index_sequence<kLanes>{}); }

inline vfloat load(const float* p, int64_t n = kLanes) {
  vfloat v = splat(0.0f);
  if (n == kLanes) {
    std::memcpy(&v, p, sizeof v);
  } else {
    std::memcpy(&v, p, sizeof(float) * n);
  }
  return v;
}

inline void store(float* p, vfloat v, int64_t n = kLanes) {
  if (n == kLanes) {
    std::memcpy(p, &v, sizeof v);
  } else {
    std::memcpy(p, &v, sizeof(float) * n);
  }
}

// A store that bypasses the caches, for data written once and not read again in this call (the gate
// activations, read only by the backward pass): it leaves the cache to the weights and the step's rows, and
// skips reading each line before writing it. A plain store where the CPU or the address does not allow it.
inline void store_streaming(float* p, vfloat v, int64_t n = kLanes) {
#if defined(__AVX512F__) && LSTM_JAX_LANES == 16
  if (n == kLanes && reinterpret_cast<uintptr_t>(p) % 64 == 0) return _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
#elif defined(__AVX__) && LSTM_JAX_LANES == 8
  if (n == kLanes && reinterpret_cast<uintptr_t>(p) % 32 == 0) return _mm256_stream_ps(p, reinterpret_cast<__m256&>(v));
#endif
  store(p, v, n);
}

// Streaming stores are not ordered with other stores: fence them before another thread or call reads them.
inline void fence_streaming() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// exp, lane by lane: 2^n * p(r) with x = n ln 2 + r, |r| <= ln(2) / 2 (Cephes' expf polynomial).
inline vfloat exp_v(vfloat x) {
  // Clamped so that a NaN fails both tests and stays NaN (as `x < 88 ? x : 88` would not): the train step's
  // finiteness check must see it, as it does from the lax.scan loops.
  x = x > splat(88.0f) ? splat(88.0f) : x;
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vfloat magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vfloat t = x * splat(1.44269504088896341f) + magic;
  vfloat n = t - magic;
  vfloat r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vint ti, magic_bits;
  std::memcpy(&ti, &t, sizeof t);
  std::memcpy(&magic_bits, &magic, sizeof magic);
  vint scale_bits = ((ti - magic_bits) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

inline vfloat sigmoid_v(vfloat x) { return splat(1.0f) / (splat(1.0f) + exp_v(-x)); }

// tanh from exp(-2|x|), and its Taylor series near 0 where 1 - t would cancel.
inline vfloat tanh_v(vfloat x) {
  vfloat a = x < splat(0.0f) ? -x : x;
  vfloat t = exp_v(splat(-2.0f) * a);
  vfloat far = (splat(1.0f) - t) / (splat(1.0f) + t);
  vfloat a2 = a * a;
  vfloat near = a + a * a2 * (splat(-1.0f / 3) + a2 * (splat(2.0f / 15) + a2 * splat(-17.0f / 315)));
  vfloat y = a < splat(0.0625f) ? near : far;
  return x < splat(0.0f) ? -y : y;
}

// bfloat16 numbers as their bits: the upper half of a float's.
using bf16 = uint16_t;
using vuint = uint32_t __attribute__((vector_size(4 * kLanes)));
using vbf16 = uint16_t __attribute__((vector_size(2 * kLanes)));

// A float's bits with the nearest bfloat16, ties to even (as AMX and AVX-512 BF16 round), in their upper half:
// infinities stay infinities, and NaNs stay NaNs (made quiet, so that no payload rounds into an infinity).
template <typename Bits>
inline Bits rounded_bits(Bits bits) {
  return (bits & 0x7fffffffu) > 0x7f800000u ? bits | 0x00400000u : bits + 0x7fffu + ((bits >> 16) & 1u);
}

inline bf16 to_bf16(float a) {
  uint32_t bits;
  std::memcpy(&bits, &a, sizeof bits);
  return static_cast<bf16>(rounded_bits(bits) >> 16);
}

inline void store_bf16(bf16* p, vfloat v, int64_t n = kLanes) {
  vuint bits;
  std::memcpy(&bits, &v, sizeof bits);
  const vbf16 rounded = __builtin_convertvector(rounded_bits(bits) >> 16, vbf16);
  std::memcpy(p, &rounded, sizeof(bf16) * n);
}

// How many blocks of `size` cover n, and n rounded up to a whole number of them.
constexpr int64_t blocks_of(int64_t n, int64_t size) { return (n + size - 1) / size; }
constexpr int64_t round_up(int64_t n, int64_t to) { return blocks_of(n, to) * to; }

// AMX multiplies tiles of 16 rows of 64 bytes: A (16 rows x 32 bf16 of depth), B (16 pairs of depth x 16
// columns, the two numbers of a pair side by side) into C (16 rows x 16 floats), with float32 sums.
constexpr int64_t kTileHeight = 16, kTileDepth = 32, kTileWidth = 16, kTileElements = kTileHeight * kTileDepth;

int64_t column_blocks_for(int64_t columns) { return blocks_of(columns, kTileWidth); }

// B (depth x columns, depth a multiple of kTileDepth) as AMX tiles: tile (j, kt) of column block j and depth
// block kt at packed + (j * depth / kTileDepth + kt) * kTileElements, element (k, n) of a tile at
// [(k / 2) * 32 + n * 2 + k % 2]. at(k, n) gives B's elements (0 past its data); columns past `columns` are 0.
template <typename At>
void pack_tiles(At at, int64_t depth, int64_t columns, bf16* packed) {
  const int64_t stride = depth * kTileWidth;  // from one column block to the next
  for (int64_t k = 0; k < depth; ++k) {
    bf16* row = packed + (k / kTileDepth) * kTileElements + (k % kTileDepth / 2) * 2 * kTileWidth + k % 2;
    for (int64_t n = 0; n < round_up(columns, kTileWidth); ++n)
      row[(n / kTileWidth) * stride + (n % kTileWidth) * 2] = n < columns ? to_bf16(at(k, n)) : 0;
  }
}

// Rows of an AMX gemm's left operand: bf16, ld elements apart, depth a multiple of kTileDepth; a operand of
// depth 0 is absent.
struct Bf16Rows {
  const bf16* a;
  int64_t ld;
  int64_t depth;
};

#ifdef LSTM_JAX_AMX
// The process may use the tile registers only once Linux has granted it the state to save them in.
bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return permitted;
}

// The tile configuration of one thread for its life in a call that uses the tiles (`used`): 8 tiles of 16 rows of
// 64 bytes (C in 0-3, A in 4-5, B in 6-7).
class TileScope {
 public:
  explicit TileScope(bool used) : used_(used) {
    if (!used) return;
    struct {
      uint8_t palette = 1, start_row = 0, reserved[14] = {};
      uint16_t bytes_per_row[16] = {};
      uint8_t rows[16] = {};
    } config;
    for (int tile = 0; tile < 8; ++tile) config.bytes_per_row[tile] = 64, config.rows[tile] = kTileHeight;
    _tile_loadconfig(&config);
  }
  ~TileScope() {
    if (used_) _tile_release();
  }

 private:
  const bool used_;
};

inline void prefetch(const void* line) { _mm_prefetch(static_cast<const char*>(line), _MM_HINT_T0); }

inline void prefetch_tile(const bf16* tile) {
  for (int64_t line = 0; line < kTileElements * int64_t{sizeof(bf16)}; line += 64) prefetch(tile + line / 2);
}

// C's rows [0, 16 R) and columns [0, 16 W) (+)= [first, second] @ B, for B's packed tiles from column block 0
// on (blocks `stride` elements apart), R and W each 1 or 2.
template <int R, int W>
void tile_block(Bf16Rows first, Bf16Rows second, const bf16* b, int64_t stride, float* c, int64_t ldc,
                bool accumulate) {
  const int64_t ldc_bytes = ldc * sizeof(float);
  if (accumulate) {
    _tile_loadd(0, c, ldc_bytes);
    if constexpr (W > 1) _tile_loadd(1, c + kTileWidth, ldc_bytes);
    if constexpr (R > 1) _tile_loadd(2, c + kTileHeight * ldc, ldc_bytes);
    if constexpr (R > 1 && W > 1) _tile_loadd(3, c + kTileHeight * ldc + kTileWidth, ldc_bytes);
  } else {
    _tile_zero(0);
    if constexpr (W > 1) _tile_zero(1);
    if constexpr (R > 1) _tile_zero(2);
    if constexpr (R > 1 && W > 1) _tile_zero(3);
  }
  for (const Bf16Rows& operand : {first, second}) {
    const int64_t lda_bytes = operand.ld * sizeof(bf16);
    for (int64_t k = 0; k < operand.depth; k += kTileDepth, b += kTileElements) {
      if (k + kTileDepth < operand.depth) {  // the next step's tiles, from L2 (tile loads from L2 stall)
        for (int64_t r = 0; r < R * kTileHeight; ++r) prefetch(operand.a + r * operand.ld + k + kTileDepth);
        for (int64_t w = 0; w < W; ++w) prefetch_tile(b + w * stride + kTileElements);
      }
      // each load just before its first product, so that loads overlap the products already issued
      _tile_loadd(4, operand.a + k, lda_bytes);
      _tile_loadd(6, b, 2 * kTileWidth * sizeof(bf16));
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (W > 1) _tile_loadd(7, b + stride, 2 * kTileWidth * sizeof(bf16));
      if constexpr (W > 1) _tile_dpbf16ps(1, 4, 7);
      if constexpr (R > 1) _tile_loadd(5, operand.a + kTileHeight * operand.ld + k, lda_bytes);
      if constexpr (R > 1) _tile_dpbf16ps(2, 5, 6);
      if constexpr (R > 1 && W > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, ldc_bytes);
  if constexpr (W > 1) _tile_stored(1, c + kTileWidth, ldc_bytes);
  if constexpr (R > 1) _tile_stored(2, c + kTileHeight * ldc, ldc_bytes);
  if constexpr (R > 1 && W > 1) _tile_stored(3, c + kTileHeight * ldc + kTileWidth, ldc_bytes);
}
#endif

// C (rows x 16 * column_blocks floats, ldc apart) (+)= [first, second] @ B for B packed by pack_tiles (depth
// first.depth + second.depth), rows a multiple of kTileHeight. Column blocks in pairs on the outside: their B
// tiles stay in L1 while every row passes.
void tile_gemm(Bf16Rows first, Bf16Rows second, int64_t rows, const bf16* packed, int64_t column_blocks, float* c,
               int64_t ldc, bool accumulate = false) {
#ifdef LSTM_JAX_AMX
  const int64_t stride = (first.depth + second.depth) * kTileWidth;
  for (int64_t j = 0; j < column_blocks; j += 2) {
    const bf16* b = packed + j * stride;
    for (int64_t i = 0; i < rows; i += 2 * kTileHeight) {
      const Bf16Rows f{first.a + i * first.ld, first.ld, first.depth};
      const Bf16Rows s{second.depth ? second.a + i * second.ld : nullptr, second.ld, second.depth};
      float* ci = c + i * ldc + j * kTileWidth;
      const bool two_rows = rows - i >= 2 * kTileHeight, two_columns = column_blocks - j >= 2;
      if (two_rows && two_columns) tile_block<2, 2>(f, s, b, stride, ci, ldc, accumulate);
      else if (two_rows) tile_block<2, 1>(f, s, b, stride, ci, ldc, accumulate);
      else if (two_columns) tile_block<1, 2>(f, s, b, stride, ci, ldc, accumulate);
      else tile_block<1, 1>(f, s, b, stride, ci, ldc, accumulate);
    }
  }
#else
  std::abort();  // unreachable: the handlers refuse bf16 without AMX
#endif
}

#ifndef LSTM_JAX_AMX
struct TileScope {  // no tiles to configure: bf16 calls are refused
  explicit TileScope(bool) {}
};
#endif

// Whether this build and this process can multiply in bfloat16.
bool bf16_supported() {
#ifdef LSTM_JAX_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// Rows of the left operand, for k < depth: element (r, k) is a[r * lda + k] (step 1), or, for rows packed
// by pack_rows (step kTileRows, written R), a[(r / R) * R * depth + k * R + r % R].
struct Rows {
  const float* a;
  int64_t lda;
  int64_t depth;
  int64_t step = 1;
};

// c[r][0:P] (+)= sum_k A[r][k] * panel[k][0:P], for a packed panel (rows of P = kPanel floats).
// kPackedRows: A is a packed tile, A[r][k] = a[k * kTileRows + r]; otherwise A's rows are contiguous (step 1).
template <int64_t R, bool kPackedRows>
void tile(Rows a, const float* panel, float* c, int64_t ldc, bool accumulate) {
  vfloat acc[R][kVectors];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < kVectors; ++v) acc[r][v] = accumulate ? load(c + r * ldc + v * kLanes) : splat(0.0f);
  const float* column = a.a;
  for (int64_t k = 0; k < a.depth; ++k, panel += kPanel, column += kPackedRows ? kTileRows : 1) {
    vfloat b[kVectors];
    for (int64_t v = 0; v < kVectors; ++v) b[v] = load(panel + v * kLanes);
    for (int64_t r = 0; r < R; ++r) {
      vfloat a_rk = splat(column[kPackedRows ? r : r * a.lda]);
      for (int64_t v = 0; v < kVectors; ++v) acc[r][v] += a_rk * b[v];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < kVectors; ++v) store(c + r * ldc + v * kLanes, acc[r][v]);
}

template <int64_t R>
void tile_at(Rows a, int64_t row, const float* panel, float* c, int64_t ldc, bool accumulate) {
  if (a.step == 1) {
    tile<R, false>({a.a + row * a.lda, a.lda, a.depth}, panel, c + row * ldc, ldc, accumulate);
  } else {  // packed tiles of kTileRows rows, one after the other
    tile<R, true>({a.a + row * a.depth, 1, a.depth, kTileRows}, panel, c + row * ldc, ldc, accumulate);
  }
}

// Rows [row, row + count) of one panel's columns, count <= kTileRows: one tile of count rows.
template <int64_t R = kTileRows>
void tile_rows(Rows a, int64_t row, int64_t count, const float* panel, float* c, int64_t ldc, bool accumulate) {
  if constexpr (R > 0) {
    if (count == R) return tile_at<R>(a, row, panel, c, ldc, accumulate);
    return tile_rows<R - 1>(a, row, count, panel, c, ldc, accumulate);
  }
}

// All rows of one panel's columns for one block of depth.
void panel_block(Rows a, int64_t rows, const float* panel, float* c, int64_t ldc, bool accumulate) {
  for (int64_t row = 0; row < rows; row += kTileRows)
    tile_rows(a, row, std::min(kTileRows, rows - row), panel, c, ldc, accumulate);
}

// A block of a panel (16 or 32 KiB) stays in L1 while every row passes over it.
#ifndef LSTM_JAX_DEPTH_BLOCK
#define LSTM_JAX_DEPTH_BLOCK 256
#endif
constexpr int64_t kDepthBlock = LSTM_JAX_DEPTH_BLOCK;

// C (rows x kPanel * panels) = [first, second] @ packed, depth block by depth block, and in each block panel by
// panel: the rows' block is read again by every panel, so it stays in L2 while the weights stream past it. (Panel
// by panel over the whole depth, every panel read all the rows, which at H = 512 no longer fit beside the weights.)
void gemm(Rows first, Rows second, int64_t rows, const float* packed, int64_t panels, float* c, int64_t ldc) {
  const int64_t depth = first.depth + second.depth;
  int64_t done = 0;
  bool accumulate = false;
  for (const Rows& operand : {first, second}) {
    for (int64_t k = 0; k < operand.depth; k += kDepthBlock) {
      const Rows block{operand.a + k, operand.lda, std::min(kDepthBlock, operand.depth - k)};
      for (int64_t p = 0; p < panels; ++p)
        panel_block(block, rows, packed + (p * depth + done) * kPanel, c + p * kPanel, ldc, accumulate);
      done += block.depth;
      accumulate = true;
    }
  }
}

int64_t panels_for(int64_t columns) { return blocks_of(columns, kPanel); }

// The first `columns` floats of each of `rows` rows, from rows `from_ld` apart to rows `to_ld` apart.
void copy_rows(const float* from, int64_t from_ld, float* to, int64_t to_ld, int64_t rows, int64_t columns) {
  for (int64_t r = 0; r < rows; ++r) std::copy_n(from + r * from_ld, columns, to + r * to_ld);
}

// The thread's share [begin, end) of `count` items.
std::pair<int64_t, int64_t> share(int64_t count, int64_t thread, int64_t threads) {
  return {thread * count / threads, (thread + 1) * count / threads};
}

// Row m of a weight gradient's left operand A (M x K): its K floats, and the K floats that multiply them
// (the recurrent dropout mask) or null.
struct RowOfA {
  const float* row;
  const float* mask;
};

// A^T's rows [0, K) over depth [m, m + depth), as packed tiles of kTileRows rows: element (r, k) at
// packed[(r / R) * R * depth + k * R + r % R], R = kTileRows. A is read row after row, from row_of(m) (a RowOfA).
template <typename RowOf>
void pack_rows(RowOf row_of, int64_t K, int64_t m, int64_t depth, float* packed) {
  for (int64_t k = 0; k < depth; ++k) {
    const RowOfA a = row_of(m + k);
    for (int64_t r0 = 0; r0 < K; r0 += kTileRows) {
      float* out = packed + r0 * depth + k * kTileRows;
      const int64_t rows = std::min(kTileRows, K - r0);
      if (a.mask) {
        for (int64_t r = 0; r < rows; ++r) out[r] = a.row[r0 + r] * a.mask[r0 + r];
      } else if (rows == kTileRows) {
        for (int64_t r = 0; r < kTileRows; ++r) out[r] = a.row[r0 + r];
      } else {
        for (int64_t r = 0; r < rows; ++r) out[r] = a.row[r0 + r];
      }
    }
  }
}

// Columns [first, first + width) of B (rows x G) over rows [m, m + depth), as panels: element (k, j) at
// packed[(j / P) * P * depth + k * P + j % P], P = kPanel (zeros past column G). B is read row after row.
void pack_columns(const float* b, int64_t G, int64_t first, int64_t width, int64_t m, int64_t depth, float* packed) {
  for (int64_t k = 0; k < depth; ++k) {
    const float* row = b + (m + k) * G;
    for (int64_t j = 0; j < width; j += kPanel) {
      float* out = packed + j * depth + k * kPanel;
      const int64_t columns = std::clamp<int64_t>(G - first - j, 0, kPanel);
      for (int64_t v = 0; v < kVectors; ++v) {
        const int64_t lanes = std::clamp<int64_t>(columns - v * kLanes, 0, kLanes);
        store(out + v * kLanes, lanes > 0 ? load(row + first + j + v * kLanes, lanes) : splat(0.0f));
      }
    }
  }
}

// The weight gradients dW_x (E x G) = X^T B and dW_h (H x G) = H_in^T B, for X (M x E) and H_in (M x H), their
// rows from x_row and h_row (RowOfA functions), and B = dz (M x G) row-major, summed over all M = T * N rows after
// the loop. The thread computes its share of the panels of both, a block of rows at a time, from copies of A^T and
// of its panels of B in the layout the tiles read; B's panels are packed once per block for both. (Read in place,
// both operands would be read down their columns, with rows a multiple of 1 KiB apart: few cache sets and no
// prefetching.) Each tile of A^T stays in L1 while the panels stream past it, and the tile's rows of C are read
// and written along the row, panel after panel, where the prefetcher follows them.
template <typename RowOfX, typename RowOfH>
void weight_gradients(RowOfX x_row, int64_t E, RowOfH h_row, int64_t H, const float* b, int64_t M, int64_t G,
                      float* dw_x, float* dw_h, int64_t thread, int64_t threads) {
  constexpr int64_t kRowsBlock = 128;
  const auto [first, last] = share(panels_for(G), thread, threads);
  const int64_t width = (last - first) * kPanel;
  Scratch<float> a_t(round_up(std::max(E, H), kTileRows) * kRowsBlock);
  Scratch<float> panels(width * kRowsBlock), c_x(E * width), c_h(H * width);
  for (int64_t m = 0; m < M; m += kRowsBlock) {
    const int64_t depth = std::min(kRowsBlock, M - m);
    pack_columns(b, G, first * kPanel, width, m, depth, panels.data());
    const auto add_block = [&](auto row_of, int64_t K, float* c_mine) {
      pack_rows(row_of, K, m, depth, a_t.data());
      for (int64_t row = 0; row < K; row += kTileRows) {
        for (int64_t p = 0; p < last - first; ++p) {
          tile_rows({a_t.data(), 1, depth, kTileRows}, row, std::min(kTileRows, K - row),
                    panels.data() + p * kPanel * depth, c_mine + p * kPanel, width, m > 0);
        }
      }
    };
    add_block(x_row, E, c_x.data());
    add_block(h_row, H, c_h.data());
  }
  const int64_t columns = std::max<int64_t>(0, std::min(width, G - first * kPanel));
  copy_rows(c_x.data(), width, dw_x + first * kPanel, G, E, columns);
  copy_rows(c_h.data(), width, dw_h + first * kPanel, G, H, columns);
}

// Two rows' floats, lane by lane, as pairs of bfloat16 (rounded as to_bf16) in one 32-bit word each: `even` in the
// low half, `odd` in the high half. That is a row of a B tile (pairs of depth side by side), or of the transposed
// operand of an A tile.
inline vuint bf16_pairs(vfloat even, vfloat odd) {
  vuint e, o;
  std::memcpy(&e, &even, sizeof e);
  std::memcpy(&o, &odd, sizeof o);
  return (rounded_bits(o) & 0xffff0000u) | (rounded_bits(e) >> 16);
}

constexpr int64_t kGradientRowsBlock = 8 * kTileDepth;  // rows of M per block of weight_gradients_tiles

// weight_gradients with bf16 operands on AMX tiles. For each block of rows of M, every thread packs its share of
// the rows of A^T (X^T and H_in^T, rows padded to whole tiles) into the shared a_t, then its own columns of B (dz)
// as tiles, and after a barrier multiplies all of A^T by its columns. Pairs of rows of M become one 32-bit word per
// column in both layouts, so every conversion is done a vector at a time.
template <typename RowOfX, typename RowOfH, typename Wait>
void weight_gradients_tiles(RowOfX x_row, int64_t E, RowOfH h_row, int64_t H, const float* b, int64_t M, int64_t G,
                            float* dw_x, float* dw_h, bf16* a_t, int64_t thread, int64_t threads, Wait wait) {
  constexpr int64_t kBlock = kGradientRowsBlock;
  const auto [first, last] = share(column_blocks_for(G), thread, threads);
  const int64_t width = (last - first) * kTileWidth, begin = first * kTileWidth;
  const int64_t E_tiles = round_up(E, kTileHeight), H_tiles = round_up(H, kTileHeight);
  uint32_t* a_t_pairs = reinterpret_cast<uint32_t*>(a_t);  // (E_tiles + H_tiles) rows of kBlock / 2 pairs
  Scratch<uint32_t> panels(width * kBlock / 2);
  Scratch<float> c_x(E_tiles * width), c_h(H_tiles * width);
  const auto pack_a_t = [&](auto row_of, int64_t K, int64_t m, int64_t depth, int64_t depth_padded, uint32_t* out) {
    const auto [share_begin, share_end] = share(blocks_of(K, kLanes), thread, threads);
    for (int64_t k = 0; k < depth_padded; k += 2) {
      const RowOfA even = k < depth ? row_of(m + k) : RowOfA{}, odd = k + 1 < depth ? row_of(m + k + 1) : RowOfA{};
      const auto at = [&](const RowOfA& a, int64_t r, int64_t lanes) {
        if (!a.row) return splat(0.0f);
        return a.mask ? load(a.row + r, lanes) * load(a.mask + r, lanes) : load(a.row + r, lanes);
      };
      for (int64_t r = share_begin * kLanes; r < std::min(K, share_end * kLanes); r += kLanes) {
        const int64_t lanes = std::min(kLanes, K - r);
        const vuint pairs = bf16_pairs(at(even, r, lanes), at(odd, r, lanes));
        for (int64_t i = 0; i < lanes; ++i) out[(r + i) * (kBlock / 2) + k / 2] = pairs[i];
      }
    }
  };
  for (int64_t m = 0; m < M; m += kBlock) {
    const int64_t depth = std::min(kBlock, M - m), depth_padded = round_up(depth, kTileDepth);
    pack_a_t(x_row, E, m, depth, depth_padded, a_t_pairs);
    pack_a_t(h_row, H, m, depth, depth_padded, a_t_pairs + E_tiles * kBlock / 2);
    for (int64_t k = 0; k < depth_padded; k += 2) {  // B's pairs of rows, column block by column block
      const float* even = k < depth ? b + (m + k) * G : nullptr;
      const float* odd = k + 1 < depth ? b + (m + k + 1) * G : nullptr;
      for (int64_t n = 0; n < width; n += kLanes) {
        const int64_t lanes = std::clamp<int64_t>(G - begin - n, 0, kLanes);
        const vuint pairs = bf16_pairs(even && lanes ? load(even + begin + n, lanes) : splat(0.0f),
                                       odd && lanes ? load(odd + begin + n, lanes) : splat(0.0f));
        std::memcpy(&panels[(n / kTileWidth) * depth_padded * kTileWidth / 2 + (k / 2) * kTileWidth + n % kTileWidth],
                    &pairs, sizeof pairs);
      }
    }
    wait();  // every thread's rows of a_t are packed
    if (width > 0) {
      const bf16* packed = reinterpret_cast<const bf16*>(panels.data());
      tile_gemm({a_t, kBlock, depth_padded}, {nullptr, 0, 0}, E_tiles, packed, width / kTileWidth, c_x.data(), width,
                m > 0);
      tile_gemm({a_t + E_tiles * kBlock, kBlock, depth_padded}, {nullptr, 0, 0}, H_tiles, packed, width / kTileWidth,
                c_h.data(), width, m > 0);
    }
    wait();  // before the next block's rows are packed over these
  }
  const int64_t columns = std::max<int64_t>(0, std::min(width, G - begin));
  copy_rows(c_x.data(), width, dw_x + begin, G, E, columns);
  copy_rows(c_h.data(), width, dw_h + begin, G, H, columns);
}

// Asks the kernel to back a large buffer with 2 MiB pages where it can (transparent huge pages in
// "madvise" mode). XLA allocates every output afresh, so the first write of each 4 KiB page would
// otherwise fault: a fifth of a training step's time at 64,128,128,256. Only whole 2 MiB pages
// inside the buffer are advised, so nothing outside it changes; without huge pages this does nothing.
void prefer_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

template <typename Buffer>
void prefer_huge_pages(Buffer& buffer) {
  prefer_huge_pages(buffer->untyped_data(), buffer->size_bytes());
}

class Barrier {
 public:
  explicit Barrier(int64_t parties) : parties_(parties) {}
  void wait() {
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == parties_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins > 4000) std::this_thread::yield();  // a shared machine may have descheduled the other party
    }
  }

 private:
  const int64_t parties_;
  std::atomic<int64_t> arrived_{0};
  std::atomic<int64_t> generation_{0};
};

// The cores this process may run on (its affinity mask, which a container's cpuset narrows).
int64_t usable_cores() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
  return std::max<unsigned>(1, std::thread::hardware_concurrency());
}

// LSTM_JAX_NUM_THREADS where it is a whole number >= 1, else 0 (unset, or any other value, which lstm_jax.native
// warns of).
int64_t requested_threads() {
  const char* env = std::getenv("LSTM_JAX_NUM_THREADS");
  if (env == nullptr) return 0;
  const std::string text(env);
  const bool digits = !text.empty() && text.size() < 10 &&
                      std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
  return digits ? std::stol(text) : 0;
}

// One thread per usable core (or as requested), but none without a vector of units to own.
int64_t thread_count(int64_t hidden) {
  const int64_t requested = requested_threads();
  const int64_t threads = requested >= 1 ? requested : usable_cores();
  return std::max<int64_t>(1, std::min(threads, blocks_of(hidden, kLanes)));
}

// The hidden units [begin, begin + count) of one thread: blocks of whole vectors.
struct Units {
  int64_t begin;
  int64_t count;
};

Units units_of(int64_t thread, int64_t threads, int64_t hidden) {
  const int64_t per_thread = round_up(blocks_of(hidden, threads), kLanes);
  const int64_t begin = std::min(hidden, thread * per_thread);
  return {begin, std::min(hidden, begin + per_thread) - begin};
}

template <typename Work>
void run_threads(int64_t threads, Work work) {
  Barrier barrier(threads);
  std::vector<std::thread> helpers;
  for (int64_t t = 1; t < threads; ++t) helpers.emplace_back([&, t] { work(t, barrier); });
  work(0, barrier);
  for (auto& helper : helpers) helper.join();
}

// Panels of the thread's gate columns of [W_x; W_h]: column q * count + j is gate q of unit begin + j. Such columns
// lie side by side in W within one gate, so each row of W is copied in runs (one or two per panel), not column by
// column: on short sequences (SST-2's median is 7 tokens) the packing is a sizeable part of a call.
Scratch<float> pack_forward(const float* w_x, const float* w_h, int64_t inputs, int64_t hidden, Units units) {
  const int64_t depth = inputs + hidden, gates = 4 * hidden, columns = 4 * units.count;
  Scratch<float> packed(panels_for(columns) * depth * kPanel, 0.0f);
  struct Run {
    int64_t to, from, count;  // packed[to + k * kPanel + i] = W[k][from + i] for i < count
  };
  std::vector<Run> runs;
  for (int64_t column = 0; column < columns;) {
    const int64_t gate = column / units.count, unit = column % units.count;
    const int64_t count = std::min(units.count - unit, kPanel - column % kPanel);
    runs.push_back({(column / kPanel) * depth * kPanel + column % kPanel, gate * hidden + units.begin + unit, count});
    column += count;
  }
  for (int64_t k = 0; k < depth; ++k) {  // W's rows in order: a strided walk down its columns is far slower
    const float* row = k < inputs ? w_x + k * gates : w_h + (k - inputs) * gates;
    for (const Run& run : runs) std::copy_n(row + run.from, run.count, packed.data() + run.to + k * kPanel);
  }
  return packed;
}

// pack_forward's columns as AMX tiles, over a depth of W_x's rows, zeros to a whole tile depth, then W_h's rows
// and zeros likewise.
Scratch<bf16> pack_forward_tiles(const float* w_x, const float* w_h, int64_t inputs, int64_t hidden, Units units) {
  const int64_t inputs_padded = round_up(inputs, kTileDepth), depth = inputs_padded + round_up(hidden, kTileDepth);
  const int64_t gates = 4 * hidden, columns = 4 * units.count;
  Scratch<bf16> packed(depth * round_up(columns, kTileWidth));
  const auto at = [&](int64_t k, int64_t n) {
    const int64_t column = (n / units.count) * hidden + units.begin + n % units.count;
    if (k < inputs) return w_x[k * gates + column];
    k -= inputs_padded;
    return k >= 0 && k < hidden ? w_h[k * gates + column] : 0.0f;
  };
  pack_tiles(at, depth, columns, packed.data());
  return packed;
}

// W^T's columns [first, first + count) as AMX tiles, for W (rows x depth): column j is W's row first + j.
Scratch<bf16> pack_transposed_tiles(const float* w, int64_t depth, int64_t first, int64_t count) {
  const int64_t depth_padded = round_up(depth, kTileDepth);
  Scratch<bf16> packed(depth_padded * round_up(count, kTileWidth));
  pack_tiles([&](int64_t k, int64_t n) { return k < depth ? w[(first + n) * depth + k] : 0.0f; }, depth_padded, count,
             packed.data());
  return packed;
}

// Panels of W^T's columns [first, first + count), for W (rows x depth): column j is W's row first + j.
Scratch<float> pack_transposed(const float* w, int64_t depth, int64_t first, int64_t count) {
  Scratch<float> packed(panels_for(count) * depth * kPanel, 0.0f);
  for (int64_t j = 0; j < count; ++j) {
    const float* row = w + (first + j) * depth;
    float* out = packed.data() + (j / kPanel) * depth * kPanel + j % kPanel;
    for (int64_t k = 0; k < depth; ++k) out[k * kPanel] = row[k];
  }
  return packed;
}

struct Sequence {
  int64_t steps, rows, inputs, hidden;
  bool reverse;
  const bool* valid;   // (T, N) or null
  const float* mask;   // (N, H) or null: multiplies h where it enters the recurrent matmul
  bool bf16;           // the matmuls' operands rounded to bfloat16 (products on AMX tiles, float32 sums)
  int64_t step(int64_t s) const { return reverse ? steps - 1 - s : s; }
  bool keep(int64_t t, int64_t n) const { return valid == nullptr || valid[t * rows + n]; }
};

// With acts null (inference), nothing is saved for a backward pass: c_seq is then (N, H), the cell
// state updated in place, which each thread reads and writes only in its own units.
void forward(const Sequence& seq, const float* x, const float* h0, const float* c0, const float* w_x,
             const float* w_h, const float* bias, float* acts, float* h_seq, float* c_seq) {
  const int64_t N = seq.rows, E = seq.inputs, H = seq.hidden, G = 4 * H;
  const int64_t threads = thread_count(H);
  // h * mask, double-buffered by step parity, for the float32 matmul
  Scratch<float> masked_h(seq.mask && !seq.bf16 ? 2 * N * H : 0);
  // With bf16: x, and h * mask double-buffered by step parity, in bfloat16, rows padded to whole tiles and each
  // row's inputs and units each to a whole tile depth, with zeros.
  const int64_t N_tiles = round_up(N, kTileHeight), E_tiles = round_up(E, kTileDepth);
  const int64_t H_tiles = round_up(H, kTileDepth);
  Scratch<bf16> x_b(seq.bf16 ? seq.steps * N_tiles * E_tiles : 0), h_b(seq.bf16 ? 2 * N_tiles * H_tiles : 0);
  run_threads(threads, [&](int64_t thread, Barrier& barrier) {
    const Units units = units_of(thread, threads, H);
    const int64_t columns = 4 * units.count, panels = panels_for(columns), ldz = panels * kPanel;
    const TileScope tiles(seq.bf16);
    const Scratch<float> packed = seq.bf16 ? Scratch<float>() : pack_forward(w_x, w_h, E, H, units);
    const Scratch<bf16> packed_b = seq.bf16 ? pack_forward_tiles(w_x, w_h, E, H, units) : Scratch<bf16>();
    Scratch<float> z((seq.bf16 ? N_tiles : N) * ldz);
    if (seq.bf16) {
      const auto [first, last] = share(seq.steps * N, thread, threads);
      for (int64_t r = first; r < last; ++r)
        for (int64_t e = 0; e < E; ++e) x_b[((r / N) * N_tiles + r % N) * E_tiles + e] = to_bf16(x[r * E + e]);
    }
    if (seq.mask || seq.bf16) {  // the first step's h * mask, where its matmul reads it
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t j = units.begin; j < units.begin + units.count; ++j) {
          const float h_in = seq.mask ? h0[n * H + j] * seq.mask[n * H + j] : h0[n * H + j];
          if (seq.bf16) h_b[n * H_tiles + j] = to_bf16(h_in);
          else masked_h[n * H + j] = h_in;
        }
      }
    }
    if (!acts) copy_rows(c0 + units.begin, H, c_seq + units.begin, H, N, units.count);
    barrier.wait();
    for (int64_t s = 0; s < seq.steps; ++s) {
      const int64_t t = seq.step(s), t_prev = seq.step(s - 1);
      const float* h_prev = s == 0 ? h0 : h_seq + t_prev * N * H;
      const float* c_prev = !acts ? c_seq : s == 0 ? c0 : c_seq + t_prev * N * H;
      float* c_next = acts ? c_seq + t * N * H : c_seq;
      if (units.count > 0 && seq.bf16) {
        tile_gemm({x_b.data() + t * N_tiles * E_tiles, E_tiles, E_tiles},
                  {h_b.data() + (s % 2) * N_tiles * H_tiles, H_tiles, H_tiles}, N_tiles, packed_b.data(),
                  column_blocks_for(columns), z.data(), ldz);
      } else if (units.count > 0) {
        const float* h_in = seq.mask ? masked_h.data() + (s % 2) * N * H : h_prev;
        gemm({x + t * N * E, E, E}, {h_in, H, H}, N, packed.data(), panels, z.data(), ldz);
      }
      float* next_masked = seq.mask ? masked_h.data() + ((s + 1) % 2) * N * H : nullptr;  // buffers that exist
      bf16* next_b = seq.bf16 ? h_b.data() + ((s + 1) % 2) * N_tiles * H_tiles : nullptr;
      for (int64_t n = 0; n < N; ++n) {
        const float* z_row = z.data() + n * ldz;
        const int64_t at = (t * N + n) * H, prev_at = n * H;
        const bool keep = seq.keep(t, n);
        for (int64_t j = 0; j < units.count; j += kLanes) {
          const int64_t lanes = std::min(kLanes, units.count - j), unit = units.begin + j;
          const float* b = bias + unit;
          vfloat i = sigmoid_v(load(z_row + j, lanes) + load(b, lanes));
          vfloat f = sigmoid_v(load(z_row + units.count + j, lanes) + load(b + H, lanes));
          vfloat g = tanh_v(load(z_row + 2 * units.count + j, lanes) + load(b + 2 * H, lanes));
          vfloat o = sigmoid_v(load(z_row + 3 * units.count + j, lanes) + load(b + 3 * H, lanes));
          vfloat c = f * load(c_prev + prev_at + unit, lanes) + i * g;
          vfloat h = o * tanh_v(c);
          if (!keep) c = load(c_prev + prev_at + unit, lanes), h = load(h_prev + prev_at + unit, lanes);
          if (acts) {
            float* act = acts + (t * N + n) * G + unit;
            store_streaming(act, i, lanes), store_streaming(act + H, f, lanes), store_streaming(act + 2 * H, g, lanes),
                store_streaming(act + 3 * H, o, lanes);
          }
          store(c_next + prev_at + unit, c, lanes), store(h_seq + at + unit, h, lanes);
          const vfloat h_in_next = seq.mask ? h * load(seq.mask + prev_at + unit, lanes) : h;
          if (seq.bf16) store_bf16(next_b + n * H_tiles + unit, h_in_next, lanes);
          else if (seq.mask) store(next_masked + prev_at + unit, h_in_next, lanes);
        }
      }
      barrier.wait();
    }
    fence_streaming();
  });
}

// What the forward pass read and saved.
struct Saved {
  const float *x, *h0, *c0, *w_x, *w_h, *acts, *h_seq, *c_seq;
};

struct Gradients {
  float *dz, *dx, *dw_x, *dw_h, *dh0, *dc0;
};

// dx (rows x E) = dz (rows x G) @ W_x^T, in blocks of rows through a buffer as wide as whole panels.
void input_gradient(const float* dz, int64_t rows, int64_t G, const Scratch<float>& w_x_t, int64_t E, float* dx) {
  constexpr int64_t kRowsBlock = 16 * kTileRows;
  const int64_t panels = panels_for(E), width = panels * kPanel;
  Scratch<float> block(kRowsBlock * width);
  for (int64_t row = 0; row < rows; row += kRowsBlock) {
    const int64_t count = std::min(kRowsBlock, rows - row);
    gemm({dz + row * G, G, G}, {nullptr, 0, 0}, count, w_x_t.data(), panels, block.data(), width);
    copy_rows(block.data(), width, dx + row * E, E, count, E);
  }
}

void backward(const Sequence& seq, const Saved& saved, const float* dy, const float* dh_last, const float* dc_last,
              const Gradients& out) {
  const int64_t T = seq.steps, N = seq.rows, E = seq.inputs, H = seq.hidden, G = 4 * H;
  const float *acts = saved.acts, *c_seq = saved.c_seq, *c0 = saved.c0;
  // dz may be acts' own buffer (native.py aliases them): each vector of acts is read before its dz is written.
  float* dz = out.dz;
  const int64_t threads = thread_count(H);
  const bool rounded = seq.bf16;  // bfloat16 operands
  // for dx, which every thread needs whole
  const Scratch<float> w_x_t = rounded ? Scratch<float>() : pack_transposed(saved.w_x, G, 0, E);
  const Scratch<bf16> w_x_t_b = rounded ? pack_transposed_tiles(saved.w_x, G, 0, E) : Scratch<bf16>();
  // With bf16: every step's dz in bfloat16, rows padded to whole tiles and to a whole tile depth, with zeros.
  const int64_t N_tiles = round_up(N, kTileHeight), G_tiles = round_up(G, kTileDepth);
  const auto free_lines = [](bf16* p) { ::operator delete(p, LineAligned<bf16>::kLine); };
  std::unique_ptr<bf16[], decltype(free_lines)> dz_b(
      rounded ? LineAligned<bf16>().allocate(T * N_tiles * G_tiles) : nullptr, free_lines);  // not zeroed
  if (rounded) prefer_huge_pages(dz_b.get(), sizeof(bf16) * T * N_tiles * G_tiles);
  // the rows of X^T and H_in^T that weight_gradients_tiles packs for every thread, rows past E and H zero
  const int64_t a_t_rows = round_up(E, kTileHeight) + round_up(H, kTileHeight);
  Scratch<bf16> a_t(rounded && out.dw_x ? a_t_rows * kGradientRowsBlock : 0, 0);
  for (int64_t row = 0; rounded && row < T * N_tiles; ++row) {  // zeros past G, and in the rows past N
    bf16* dz_row = dz_b.get() + row * G_tiles;
    std::fill(dz_row + (row % N_tiles < N ? G : 0), dz_row + G_tiles, 0);
  }
  run_threads(threads, [&](int64_t thread, Barrier& barrier) {
    const Units units = units_of(thread, threads, H);
    const int64_t panels = panels_for(units.count), ldd = panels * kPanel;
    const TileScope tiles(rounded);
    const Scratch<float> packed =
        rounded ? Scratch<float>() : pack_transposed(saved.w_h, G, units.begin, units.count);
    const Scratch<bf16> packed_b =
        rounded ? pack_transposed_tiles(saved.w_h, G, units.begin, units.count) : Scratch<bf16>();
    // The thread's columns of the carried (dh, dc), of dz @ W_h^T and of the gradient that skips a padded step.
    Scratch<float> dh(N * units.count), dc(N * units.count), dh_in((rounded ? N_tiles : N) * ldd);
    Scratch<float> dh_skip(N * units.count, 0.0f);
    copy_rows(dh_last + units.begin, H, dh.data(), units.count, N, units.count);
    copy_rows(dc_last + units.begin, H, dc.data(), units.count, N, units.count);
    for (int64_t s = seq.steps - 1; s >= 0; --s) {
      const int64_t t = seq.step(s), t_prev = seq.step(s - 1);
      const float* c_prev = s == 0 ? c0 : c_seq + t_prev * N * H;
      for (int64_t n = 0; n < N; ++n) {
        const bool keep = seq.keep(t, n);
        const int64_t at = (t * N + n) * H, mine = n * units.count;
        for (int64_t j = 0; j < units.count; j += kLanes) {
          const int64_t lanes = std::min(kLanes, units.count - j), unit = units.begin + j;
          const float* act = acts + (t * N + n) * G + unit;
          vfloat i = load(act, lanes), f = load(act + H, lanes), g = load(act + 2 * H, lanes), o = load(act + 3 * H, lanes);
          vfloat dh_new = load(&dh[mine + j], lanes) + load(dy + at + unit, lanes);
          vfloat dc_in = load(&dc[mine + j], lanes), dc_skip = splat(0.0f);
          if (!keep) {
            store(&dh_skip[mine + j], load(&dh[mine + j], lanes), lanes);
            dc_skip = dc_in, dh_new = dc_in = splat(0.0f);
          }
          vfloat tanh_c = tanh_v(load(c_seq + at + unit, lanes));
          vfloat dc_new = dc_in + dh_new * o * (splat(1.0f) - tanh_c * tanh_c);
          const vfloat dz_gates[4] = {dc_new * g * i * (splat(1.0f) - i),
                                      dc_new * load(c_prev + n * H + unit, lanes) * f * (splat(1.0f) - f),
                                      dc_new * i * (splat(1.0f) - g * g), dh_new * tanh_c * o * (splat(1.0f) - o)};
          float* dz_row = dz + (t * N + n) * G + unit;
          for (int64_t q = 0; q < 4; ++q) store(dz_row + q * H, dz_gates[q], lanes);
          for (int64_t q = 0; rounded && q < 4; ++q)
            store_bf16(dz_b.get() + (t * N_tiles + n) * G_tiles + q * H + unit, dz_gates[q], lanes);
          store(&dc[mine + j], dc_new * f + dc_skip, lanes);
        }
      }
      barrier.wait();  // every thread's columns of dz_t are written
      if (units.count > 0 && rounded) {
        tile_gemm({dz_b.get() + t * N_tiles * G_tiles, G_tiles, G_tiles}, {nullptr, 0, 0}, N_tiles, packed_b.data(),
                  column_blocks_for(units.count), dh_in.data(), ldd);
      } else if (units.count > 0) {
        gemm({dz + t * N * G, G, G}, {nullptr, 0, 0}, N, packed.data(), panels, dh_in.data(), ldd);
      }
      for (int64_t n = 0; n < N; ++n) {
        const int64_t mine = n * units.count;
        for (int64_t j = 0; j < units.count; j += kLanes) {
          const int64_t lanes = std::min(kLanes, units.count - j);
          vfloat grad = load(&dh_in[n * ldd + j], lanes);
          if (seq.mask) grad *= load(seq.mask + n * H + units.begin + j, lanes);
          store(&dh[mine + j], grad + load(&dh_skip[mine + j], lanes), lanes);
          if (!seq.keep(t, n)) store(&dh_skip[mine + j], splat(0.0f), lanes);
        }
      }
    }
    copy_rows(dh.data(), units.count, out.dh0 + units.begin, H, N, units.count);
    copy_rows(dc.data(), units.count, out.dc0 + units.begin, H, N, units.count);
    // After the loop, the gradients that need every step's dz: each a matmul over all T * N rows.
    if (rounded) {  // the thread's share of the steps, each a tile gemm over its padded rows
      const auto [step_begin, step_end] = share(T, thread, threads);
      const int64_t width = round_up(E, kTileWidth);
      Scratch<float> block(N_tiles * width);
      for (int64_t t = step_begin; t < step_end; ++t) {
        tile_gemm({dz_b.get() + t * N_tiles * G_tiles, G_tiles, G_tiles}, {nullptr, 0, 0}, N_tiles, w_x_t_b.data(),
                  width / kTileWidth, block.data(), width);
        copy_rows(block.data(), width, out.dx + t * N * E, E, N, E);
      }
    } else {
      const auto [row_begin, row_end] = share(T * N, thread, threads);
      input_gradient(dz + row_begin * G, row_end - row_begin, G, w_x_t, E, out.dx + row_begin * E);
    }
    const auto x_row = [&](int64_t m) { return RowOfA{saved.x + m * E, nullptr}; };
    const auto h_in_row = [&](int64_t m) {  // the h that entered the matmul of row m's step: the previous h, masked
      const int64_t t = m / N, n = m % N, t_prev = seq.reverse ? t + 1 : t - 1;
      const float* h = t_prev < 0 || t_prev >= T ? saved.h0 : saved.h_seq + t_prev * N * H;
      return RowOfA{h + n * H, seq.mask ? seq.mask + n * H : nullptr};
    };
    if (out.dw_x && rounded) {
      weight_gradients_tiles(x_row, E, h_in_row, H, dz, T * N, G, out.dw_x, out.dw_h, a_t.data(), thread, threads,
                             [&] { barrier.wait(); });
    } else if (out.dw_x) {
      weight_gradients(x_row, E, h_in_row, H, dz, T * N, G, out.dw_x, out.dw_h, thread, threads);
    }
  });
}

Sequence sequence_of(ffi::Buffer<ffi::F32> x_or_dy, int64_t hidden, int64_t reverse, ffi::Buffer<ffi::PRED> valid,
                     int64_t has_valid, ffi::Buffer<ffi::F32> mask, int64_t has_mask, int64_t bf16) {
  auto dims = x_or_dy.dimensions();
  return {dims[0], dims[1], dims[2], hidden, reverse != 0, has_valid ? valid.typed_data() : nullptr,
          has_mask ? mask.typed_data() : nullptr, bf16 != 0};
}

ffi::Error unsupported_bf16() {
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "lstm_jax: this CPU kernel has no bfloat16 products (they need AMX); use float32 operands, or "
                    "check lstm_jax.native.bf16_supported() first");
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                       ffi::Buffer<ffi::F32> w_x, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> bias,
                       ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::F32> mask, int64_t reverse, int64_t has_valid,
                       int64_t has_mask, int64_t save, int64_t bf16, ffi::ResultBuffer<ffi::F32> acts,
                       ffi::ResultBuffer<ffi::F32> h_seq, ffi::ResultBuffer<ffi::F32> c_seq) {
  if (bf16 && !bf16_supported()) return unsupported_bf16();
  const int64_t hidden = h0.dimensions()[1];
  Sequence seq = sequence_of(x, hidden, reverse, valid, has_valid, mask, has_mask, bf16);
  for (auto* result : {&acts, &h_seq, &c_seq}) prefer_huge_pages(*result);
  forward(seq, x.typed_data(), h0.typed_data(), c0.typed_data(), w_x.typed_data(), w_h.typed_data(),
          bias.typed_data(), save ? acts->typed_data() : nullptr, h_seq->typed_data(), c_seq->typed_data());
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                        ffi::Buffer<ffi::F32> w_x, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> acts,
                        ffi::Buffer<ffi::F32> h_seq, ffi::Buffer<ffi::F32> c_seq, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::F32> dh_last, ffi::Buffer<ffi::F32> dc_last, ffi::Buffer<ffi::PRED> valid,
                        ffi::Buffer<ffi::F32> mask, int64_t reverse, int64_t has_valid, int64_t has_mask,
                        int64_t weights, int64_t bf16, ffi::ResultBuffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> dw_x, ffi::ResultBuffer<ffi::F32> dw_h,
                        ffi::ResultBuffer<ffi::F32> dh0, ffi::ResultBuffer<ffi::F32> dc0) {
  if (bf16 && !bf16_supported()) return unsupported_bf16();
  const int64_t hidden = h0.dimensions()[1];
  const Sequence seq = sequence_of(x, hidden, reverse, valid, has_valid, mask, has_mask, bf16);
  const Saved saved{x.typed_data(),    h0.typed_data(),   c0.typed_data(),    w_x.typed_data(),
                    w_h.typed_data(),  acts.typed_data(), h_seq.typed_data(), c_seq.typed_data()};
  // Not dz: it is the gate activations' buffer (native.py aliases them), whose pages the forward call wrote.
  for (auto* result : {&dx, &dw_x, &dw_h}) prefer_huge_pages(*result);
  // Without `weights` (no gradient of the weights is wanted, e.g. an input gradient with the parameters held
  // constant) the weight gradients, a third of the call's FLOPs, are skipped and their buffers zeroed.
  if (!weights) {
    for (auto* result : {&dw_x, &dw_h}) std::memset((*result)->untyped_data(), 0, (*result)->size_bytes());
  }
  backward(seq, saved, dy.typed_data(), dh_last.typed_data(), dc_last.typed_data(),
           {dz->typed_data(), dx->typed_data(), weights ? dw_x->typed_data() : nullptr,
            weights ? dw_h->typed_data() : nullptr, dh0->typed_data(), dc0->typed_data()});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (T, N, E)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0 (N, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c0 (N, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_x (E, 4H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h (H, 4H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b (4H)
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid (T, N), read if has_valid
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mask (N, H), read if has_mask
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("has_valid")
                                  .Attr<int64_t>("has_mask")
                                  .Attr<int64_t>("save")          // 0: inference, nothing saved
                                  .Attr<int64_t>("bf16")          // 1: products of bfloat16-rounded operands
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gate activations (T, N, 4H); empty if !save
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h (T, N, H)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // c (T, N, H); the final c (N, H) if !save

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (T, N, E)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0 (N, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c0 (N, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_x (E, 4H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h (H, 4H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gate activations (T, N, 4H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h (T, N, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c (T, N, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dy (T, N, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dh after the last step (N, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dc after the last step (N, H)
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid (T, N), read if has_valid
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mask (N, H), read if has_mask
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("has_valid")
                                  .Attr<int64_t>("has_mask")
                                  .Attr<int64_t>("weights")       // 0: dw_x and dw_h are not wanted (zeros)
                                  .Attr<int64_t>("bf16")          // 1: products of bfloat16-rounded operands
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dz (T, N, 4H), over the gate activations
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx (T, N, E)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw_x (E, 4H)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw_h (H, 4H)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dh0 (N, H)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dc0 (N, H)

// 1 where the `bf16` attribute is available (an AMX build that Linux lets use the tiles), else 0.
extern "C" int LstmBf16Supported() { return bf16_supported() ? 1 : 0; }
extern "C" int64_t LstmThreadCount(int64_t hidden) { return thread_count(hidden); }
extern "C" int64_t LstmRequestedThreads() { return requested_threads(); }
