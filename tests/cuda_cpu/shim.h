// shim.h -- just enough CUDA to compile fastopt's .cu sources as plain C++ (g++), for the CPU
// execution harness of tests/test_cuda_cpu.py. Blocks run one after another. With one thread
// per block (the main mode) __syncthreads() is a no-op; with more, each thread of the block is
// a std::thread and __syncthreads() a std::barrier. __shared__ memory is a static variable
// (one block at a time uses it).
#pragma once
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct FoCpuDim3 {
    unsigned x, y, z;
};
inline thread_local FoCpuDim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0};
inline FoCpuDim3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
inline std::barrier<>* fo_cpu_barrier = nullptr;
inline void __syncthreads() {
    if (fo_cpu_barrier) fo_cpu_barrier->arrive_and_wait();
}

// math: sqrtf, fabsf, powf come from <math.h>; the double overloads from <cmath>
using std::fabs;
using std::pow;
using std::sqrt;

// the bit casts of CUDA's device intrinsics
inline unsigned __float_as_uint(float x) {
    unsigned u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
}

// A launch as cuLaunchKernel sees it: args[i] points at the bytes of parameter i.
template <class... A, std::size_t... I>
void fo_cpu_run(void (*kernel)(A...), unsigned grid, unsigned block, void** args,
                std::index_sequence<I...>) {
    std::tuple<std::decay_t<A>...> vals;
    (std::memcpy(static_cast<void*>(&std::get<I>(vals)), args[I], sizeof(std::decay_t<A>)), ...);
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    if (block == 1) {
        threadIdx = {0, 0, 0};
        for (unsigned b = 0; b < grid; ++b) {
            blockIdx = {b, 0, 0};
            kernel(std::get<I>(vals)...);
        }
        return;
    }
    std::barrier<> bar(block);
    fo_cpu_barrier = &bar;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx = {b, 0, 0};
                kernel(std::get<I>(vals)...);
                bar.arrive_and_wait();  // the block is done before any thread starts the next
            }
        });
    for (auto& th : threads) th.join();
    fo_cpu_barrier = nullptr;
}

template <class... A>
void fo_cpu_launch(void (*kernel)(A...), unsigned grid, unsigned block, void** args) {
    fo_cpu_run(kernel, grid, block, args, std::index_sequence_for<A...>{});
}

// One host entry point per kernel: fo_cpu_<kernel>(grid, block, args).
#define FO_EXPORT(name)                                                        \
    extern "C" int fo_cpu_##name(unsigned grid, unsigned block, void** args) { \
        if (block < 1 || block > FO_MAX_THREADS) return 1;                     \
        fo_cpu_launch(name, grid, block, args);                                \
        return 0;                                                              \
    }
