// Instruction-set clones: a function marked EDGETL_CLONES is compiled twice on x86-64, for AVX2
// with FMA and for the baseline, and the dynamic loader picks one for the CPU it runs on (GCC's
// target_clones, an ifunc). Its loops are vectorised for each; what it inlines is compiled with
// it. On aarch64 NEON is the baseline: one version.
#pragma once

#if defined(__x86_64__)
#define EDGETL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EDGETL_CLONES
#endif
