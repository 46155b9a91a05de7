// layout.cpp -- appended to a source by the CPU harness: the struct layouts the host code
// (fastopt/kernels/cuda/_host.py) must mirror, as g++ lays them out (nvcc matches the host ABI).
#include <cstddef>
extern "C" long long fo_cpu_layout(int what) {
    switch (what) {
        case 0: return sizeof(FoTable);
        case 1: return offsetof(FoTable, ptr);
        case 2: return offsetof(FoTable, size);
        case 3: return offsetof(FoTable, chunk_base);
        case 4: return offsetof(FoTable, chunk_size);
        case 5: return offsetof(FoTable, index);
        case 6: return offsetof(FoTable, item_chunk);
        case 7: return offsetof(FoTable, n_items);
        case 8: return offsetof(FoTable, item_slot);
        case 10: return sizeof(FoHyper<float>);
        case 11: return offsetof(FoHyper<float>, flags);
        case 12: return sizeof(FoHyper<double>);
        case 13: return offsetof(FoHyper<double>, flags);
        case 20: return sizeof(FoPipe<float>);
        case 21: return offsetof(FoPipe<float>, flags);
        case 22: return sizeof(FoPipe<double>);
        case 23: return offsetof(FoPipe<double>, flags);
        case 24: return sizeof(FoStore);
        case 25: return offsetof(FoStore, flags);
        case 26: return sizeof(FoQ8);
        case 27: return offsetof(FoQ8, absmax);
        case 28: return offsetof(FoQ8, unsigned_mask);
        case 30: return FO_DEPTH;
        case 31: return FO_MAX_TENSORS;
        case 32: return FO_MAX_ITEMS;
        case 33: return FO_NSCALARS;
        case 34: return FO_MAX_THREADS;
        default: return -1;
    }
}
