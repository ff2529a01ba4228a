// Function attributes of the CPU kernels.
//
// FASTRNN_CLONES: compiled three times (x86-64-v4 with AVX-512, v3 with AVX2/FMA, baseline) and
// picked at load time for the CPU, so that plain loops vectorise as wide as the CPU allows.
// FASTRNN_INLINE: always inlined (the kernels' small helpers).

#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTRNN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTRNN_CLONES
#endif
#define FASTRNN_INLINE inline __attribute__((always_inline))
