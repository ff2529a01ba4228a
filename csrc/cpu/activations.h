// The cells' activations over arrays, as accurate as torch.sigmoid and torch.tanh (activations.cpp
// says how): in AVX-512 or AVX2/FMA vectors (as FASTRNN_CPU_ISA and the CPU choose), else with the
// C library. sigmoid equals torch.sigmoid bit for bit, tanh is within 1 ulp of torch.tanh, so
// saturated units keep torch.nn's gradients: tanh(x) rounds to 1 only where torch's does (|x|
// above ~9.01), and 1 - tanh(x)^2 and sigmoid's s (1 - s) in the tails are torch's. Double
// precision uses the C library.

#pragma once

#include <cstdint>

namespace fastrnn_cpu {

// x[0 .. n) = sigmoid(x) or tanh(x), in place.
void sigmoid_inplace(float* x, int64_t n);
void tanh_inplace(float* x, int64_t n);
void sigmoid_inplace(double* x, int64_t n);
void tanh_inplace(double* x, int64_t n);

// Which functions the float32 activations run: "avx512", "avx2" or "libm".
const char* activation_kernels();

}  // namespace fastrnn_cpu
