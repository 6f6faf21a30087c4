// dptrain's own CUDA kernels: the DP-specific work candle does not do (well).
//
// Every kernel has a Rust CPU twin behind the same function (src/kernels/mod.rs); the GPU tests
// (`dptrain selftest --device cuda`) compare the two on random inputs of several sizes.
//
// Conventions:
//  * All tensors are contiguous and row-major; sizes are passed as 64-bit integers.
//  * Compiled with -fmad=false: no multiply-add contraction, so the arithmetic rounds like the
//    CPU twin's (bit-identical where only +, *, /, sqrt are involved).
//  * Nothing that feeds clipping uses atomics: every reduction has one fixed order, so a run is
//    deterministic.

#include <stdint.h>

#define DP_THREADS 256

// ---------------------------------------------------------------------------------------------
// Per-example squared norms, accumulated across the trainable tensors.
//   g:   [b, n] f32, one example's gradient of one tensor per row
//   acc: [b] f64, acc[i] += sum_j g[i, j]^2   (one launch per tensor, in canonical order)
// Grid: b blocks (one per example) of DP_THREADS threads; each thread sums a strided slice in
// f64, then a fixed-shape tree reduction in shared memory. Non-finite values propagate (NaN/inf
// norm), which the clip-factor kernel turns into a zero weight.
extern "C" __global__ void dp_sq_norms_accumulate(const float* __restrict__ g, double* __restrict__ acc,
                                                  uint64_t b, uint64_t n) {
    __shared__ double sh[DP_THREADS];
    const uint64_t row = blockIdx.x;
    if (row >= b) return;
    const float* r = g + row * n;
    double s = 0.0;
    for (uint64_t j = threadIdx.x; j < n; j += DP_THREADS) {
        const double v = (double)r[j];
        s = __dadd_rn(s, __dmul_rn(v, v));
    }
    sh[threadIdx.x] = s;
    __syncthreads();
    for (unsigned k = DP_THREADS / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) sh[threadIdx.x] = __dadd_rn(sh[threadIdx.x], sh[threadIdx.x + k]);
        __syncthreads();
    }
    if (threadIdx.x == 0) acc[row] = __dadd_rn(acc[row], sh[0]);
}

// ---------------------------------------------------------------------------------------------
// Clip factors from squared norms.
//   sq: [b] f64; f: [b] f32
//   f[i] = 0                                 if sq[i] is not finite (the example is dropped)
//        = min(1, C / (sqrt(sq[i]) + 1e-6))  if has_clip
//        = 1                                 otherwise (the non-private baseline)
// Grid: ceil(b / DP_THREADS) blocks.
extern "C" __global__ void dp_clip_factors(const double* __restrict__ sq, float* __restrict__ f, uint64_t b,
                                           double clip, int has_clip) {
    const uint64_t i = blockIdx.x * (uint64_t)DP_THREADS + threadIdx.x;
    if (i >= b) return;
    const double norm = sqrt(sq[i]);
    if (!isfinite(norm)) {
        f[i] = 0.0f;
        return;
    }
    double c = 1.0;
    if (has_clip) {  // `clip` is C·CLIP_MARGIN (src/privacy/clip.rs): clipped norms stay ≤ C in f32
        c = clip / (norm + 1e-6);
        if (c > 1.0) c = 1.0;
    }
    f[i] = (float)c;
}

// ---------------------------------------------------------------------------------------------
// Clipped, weighted sum over the batch, added into a slice of the flat gradient.
//   g: [b, n] f32; f: [b] f32 clip factors; out: [n] f32 (a slice of the flat [P] gradient)
//   out[j] = out[j] + sum_{i = 0..b-1, f[i] != 0} f[i] * g[i, j]
// The sum over i is in f64, in order 0..b-1 (no atomics); rows with f[i] == 0 are skipped, so a
// NaN in a dropped example never reaches the sum (0 * NaN would be NaN).
// Grid: ceil(n / DP_THREADS) blocks; thread j reads column j (coalesced along each row).
extern "C" __global__ void dp_clipped_sum(const float* __restrict__ g, const float* __restrict__ f,
                                          float* __restrict__ out, uint64_t b, uint64_t n) {
    const uint64_t j = blockIdx.x * (uint64_t)DP_THREADS + threadIdx.x;
    if (j >= n) return;
    double s = 0.0;
    for (uint64_t i = 0; i < b; ++i) {
        const float fi = f[i];
        if (fi != 0.0f) s = __dadd_rn(s, __dmul_rn((double)fi, (double)g[i * n + j]));
    }
    out[j] = (float)__dadd_rn((double)out[j], s);
}

// ---------------------------------------------------------------------------------------------
// Gaussian noise from ChaCha20, counter-based.
// ChaCha20 block function (RFC 7539 rounds; djb's layout as in rand_chacha: 64-bit block counter
// in words 12-13, 64-bit stream id in words 14-15). Key: 8 little-endian words.
__device__ __forceinline__ uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

#define QR(a, b, c, d)                                   \
    a += b; d ^= a; d = rotl32(d, 16);                   \
    c += d; b ^= c; b = rotl32(b, 12);                   \
    a += b; d ^= a; d = rotl32(d, 8);                    \
    c += d; b ^= c; b = rotl32(b, 7);

__device__ void chacha20_block(const uint32_t key[8], uint64_t counter, uint64_t stream, uint32_t out[16]) {
    uint32_t s[16];
    s[0] = 0x61707865u; s[1] = 0x3320646eu; s[2] = 0x79622d32u; s[3] = 0x6b206574u;
    for (int i = 0; i < 8; ++i) s[4 + i] = key[i];
    s[12] = (uint32_t)counter; s[13] = (uint32_t)(counter >> 32);
    s[14] = (uint32_t)stream;  s[15] = (uint32_t)(stream >> 32);
    uint32_t x[16];
    for (int i = 0; i < 16; ++i) x[i] = s[i];
    for (int r = 0; r < 10; ++r) {
        QR(x[0], x[4], x[8], x[12]) QR(x[1], x[5], x[9], x[13])
        QR(x[2], x[6], x[10], x[14]) QR(x[3], x[7], x[11], x[15])
        QR(x[0], x[5], x[10], x[15]) QR(x[1], x[6], x[11], x[12])
        QR(x[2], x[7], x[8], x[13]) QR(x[3], x[4], x[9], x[14])
    }
    for (int i = 0; i < 16; ++i) out[i] = x[i] + s[i];
}

// Raw keystream blocks, for testing the generator bit for bit against rand_chacha.
//   out: [nblocks, 16] u32 = blocks first_block .. first_block + nblocks - 1 of `stream`.
extern "C" __global__ void dp_chacha20_blocks(uint32_t* __restrict__ out, uint64_t nblocks, uint64_t first_block,
                                              uint64_t stream, uint64_t k0, uint64_t k1, uint64_t k2,
                                              uint64_t k3) {
    const uint64_t blk = blockIdx.x * (uint64_t)DP_THREADS + threadIdx.x;
    if (blk >= nblocks) return;
    const uint32_t key[8] = {(uint32_t)k0, (uint32_t)(k0 >> 32), (uint32_t)k1, (uint32_t)(k1 >> 32),
                             (uint32_t)k2, (uint32_t)(k2 >> 32), (uint32_t)k3, (uint32_t)(k3 >> 32)};
    uint32_t w[16];
    chacha20_block(key, first_block + blk, stream, w);
    for (int i = 0; i < 16; ++i) out[blk * 16 + i] = w[i];
}

// Adds N(0, std^2) to every coordinate of v: [n] f32.
// Coordinate j uses 64-bit words 4(j mod 2) .. 4(j mod 2)+3 of keystream block floor(j / 2) of
// `stream` (the step number): two Box-Muller pairs on 53-bit uniforms, i.e. 4 standard normals,
// each scaled by std/2 and summed (Holohan & Braghin: a sum of Gaussians hides the floating-point
// artefacts of one), all in f64, then added to v[j] and rounded once to f32. Constant time per
// coordinate: no rejection loop. The CPU twin reads the same words from rand_chacha.
// Grid: ceil(ceil(n / 2) / DP_THREADS) blocks; one thread per keystream block.
extern "C" __global__ void dp_add_gaussian_noise(float* __restrict__ v, uint64_t n, uint64_t stream, double std,
                                                 uint64_t k0, uint64_t k1, uint64_t k2, uint64_t k3) {
    const uint64_t blk = blockIdx.x * (uint64_t)DP_THREADS + threadIdx.x;
    if (2 * blk >= n) return;
    const uint32_t key[8] = {(uint32_t)k0, (uint32_t)(k0 >> 32), (uint32_t)k1, (uint32_t)(k1 >> 32),
                             (uint32_t)k2, (uint32_t)(k2 >> 32), (uint32_t)k3, (uint32_t)(k3 >> 32)};
    uint32_t w[16];
    chacha20_block(key, blk, stream, w);
    const double part = std * 0.5;  // std / sqrt(4)
    const double two_pi = 6.283185307179586;
    for (int c = 0; c < 2; ++c) {
        const uint64_t j = 2 * blk + c;
        if (j >= n) break;
        double z = 0.0;
        for (int p = 0; p < 2; ++p) {
            const int o = 8 * c + 4 * p;
            const uint64_t a = (uint64_t)w[o] | ((uint64_t)w[o + 1] << 32);
            const uint64_t bb = (uint64_t)w[o + 2] | ((uint64_t)w[o + 3] << 32);
            const double u1 = 1.0 - (double)(a >> 11) * 0x1.0p-53;  // (0, 1]: log is finite
            const double u2 = (double)(bb >> 11) * 0x1.0p-53;
            const double r = sqrt(-2.0 * log(u1));
            double sn, cs;
            sincos(two_pi * u2, &sn, &cs);
            z = __dadd_rn(z, __dmul_rn(part, __dmul_rn(r, cs)));
            z = __dadd_rn(z, __dmul_rn(part, __dmul_rn(r, sn)));
        }
        v[j] = (float)__dadd_rn((double)v[j], z);
    }
}

// ---------------------------------------------------------------------------------------------
// Fused AdamW update of the flat LoRA parameters (one pass: read p, g, m, v; write p, m, v).
//   p: [n] f32; g: [n] f32 (the privatised gradient); m, v: [n] f64 moments
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p = p - lr (m / bc1 / (sqrt(v / bc2) + eps) + wd p), computed in f64, stored in f32
// bc1 = 1 - b1^t and bc2 = 1 - b2^t come from the host (same as the CPU twin).
// Grid: ceil(n / DP_THREADS) blocks.
extern "C" __global__ void dp_adamw_step(float* __restrict__ p, const float* __restrict__ g, double* __restrict__ m,
                                         double* __restrict__ v, uint64_t n, double lr, double b1, double b2,
                                         double eps, double wd, double bc1, double bc2) {
    const uint64_t j = blockIdx.x * (uint64_t)DP_THREADS + threadIdx.x;
    if (j >= n) return;
    const double gj = (double)g[j];
    const double mj = b1 * m[j] + (1.0 - b1) * gj;
    const double vj = b2 * v[j] + (1.0 - b2) * gj * gj;
    m[j] = mj;
    v[j] = vj;
    const double mhat = mj / bc1;
    const double vhat = vj / bc2;
    const double pj = (double)p[j];
    p[j] = (float)(pj - lr * (mhat / (sqrt(vhat) + eps) + wd * pj));
}

// ---------------------------------------------------------------------------------------------
// Exact-erf GELU and its gradient, for the model's forward/backward on the GPU (the CPU twins are
// the custom ops in src/model/ops.rs, src/model/gelu.rs). x, g, y: [n] f32; computed in f64 with
// Φ(x) = erfc(−x/√2) / 2, accurate in the far negative tail where 1 + erf(x/√2) cancels.
extern "C" __global__ void dp_gelu_erf_fwd(const float* __restrict__ x, float* __restrict__ y, uint64_t n) {
    const uint64_t j = blockIdx.x * (uint64_t)DP_THREADS + threadIdx.x;
    if (j >= n) return;
    const double v = (double)x[j];
    y[j] = (float)(0.5 * v * erfc(-v * 0.7071067811865476));
}

extern "C" __global__ void dp_gelu_erf_bwd(const float* __restrict__ x, const float* __restrict__ g,
                                           float* __restrict__ y, uint64_t n) {
    const uint64_t j = blockIdx.x * (uint64_t)DP_THREADS + threadIdx.x;
    if (j >= n) return;
    const double v = (double)x[j];
    const double d = 0.5 * erfc(-v * 0.7071067811865476) + v * 0.3989422804014327 * exp(-0.5 * v * v);
    y[j] = (float)(d * (double)g[j]);
}
