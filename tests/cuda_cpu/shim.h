// shim.h -- just enough CUDA to compile fastopt's .cu sources as plain C++ (g++), for the CPU
// execution harness of tests/test_cuda_cpu.py. Blocks run one after another, each with ONE
// thread, so __syncthreads() is a no-op and __shared__ memory can be a static variable.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct FoCpuDim3 {
    unsigned x, y, z;
};
inline FoCpuDim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
inline void __syncthreads() {}

// math: sqrtf, fabsf, powf come from <math.h>; the double overloads from <cmath>
using std::fabs;
using std::pow;
using std::sqrt;

// A launch as cuLaunchKernel sees it: args[i] points at the bytes of parameter i.
template <class... A, std::size_t... I>
void fo_cpu_run(void (*kernel)(A...), unsigned grid, void** args, std::index_sequence<I...>) {
    std::tuple<std::decay_t<A>...> vals;
    (std::memcpy(static_cast<void*>(&std::get<I>(vals)), args[I], sizeof(std::decay_t<A>)), ...);
    gridDim = {grid, 1, 1};
    blockDim = {1, 1, 1};
    threadIdx = {0, 0, 0};
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        kernel(std::get<I>(vals)...);
    }
}

template <class... A>
void fo_cpu_launch(void (*kernel)(A...), unsigned grid, void** args) {
    fo_cpu_run(kernel, grid, args, std::index_sequence_for<A...>{});
}

// One host entry point per kernel: fo_cpu_<kernel>(grid, block, args); block must be 1.
#define FO_EXPORT(name)                                                        \
    extern "C" int fo_cpu_##name(unsigned grid, unsigned block, void** args) { \
        if (block != 1) return 1;                                              \
        fo_cpu_launch(name, grid, args);                                       \
        return 0;                                                              \
    }
