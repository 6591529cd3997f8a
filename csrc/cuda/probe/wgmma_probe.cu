/* The int8 tensor cores two ways on one H200 (sm_90): wgmma (m64nNk32 .s8,
 * both operands from shared memory by descriptors) against mma.sync
 * (m16n8k32 .s8, operands in registers, what k_linear_q8s / k_linear_2bit
 * use). Two questions before prefill's int8 products move to wgmma
 * (cuda/NOTES.md, the twenty-seventh session):
 *  1. which no-swizzle K-major descriptor layout gives the right sums: a
 *     64 x 64 product over K = 256 checked against the host, each 8-row x
 *     16-byte core matrix placed two ways (K-neighbours 128 bytes apart and
 *     row groups 256, or 1,024 and 128), each with the two distances given
 *     to the descriptor's leading / stride fields one way and the other;
 *  2. the peak rate of each (operands resident: the instruction rate alone),
 *     against the ~186 TOPS k_linear_q8s reaches in a chunk.
 * Run by `device_run.sh wgmma-probe` (sm_90a: wgmma needs the arch-specific
 * target; not part of the library build, which takes csrc/cuda/*.cu only). */
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* A shared-memory matrix descriptor, no swizzle: address, leading (K) and
 * stride (M / N) byte distances between core matrices, each >> 4. */
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lead, uint32_t stride) {
    return (uint64_t)((addr >> 4) & 0x3FFF) | ((uint64_t)((lead >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((stride >> 4) & 0x3FFF) << 32);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

/* d (+)= A B, m64n64k32 s8: A and B from shared memory by their descriptors;
 * accumulate: 0 overwrites d. */
__device__ __forceinline__ void wgmma_s8_n64(int (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

/* d (+)= A B, m64n128k32 s8: A and B from shared memory by their descriptors;
 * accumulate: 0 overwrites d. */
__device__ __forceinline__ void wgmma_s8_n128(int (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* C[m][n] = sum_k A[m][k] B[n][k], 64 x 64 over K (a multiple of 32), one
 * warpgroup. Core matrix (row group i, K half j) at i 256 + j 128 (layout 0)
 * or j 1024 + i 128 (layout 1); swap: the distances to the other fields. */
__global__ void wgmma_check(const int8_t *A, const int8_t *B, int K, int *C, int layout, int swap) {
    /* 8 KB each: the swapped distances of layout 1 put row groups 1,024 apart */
    __shared__ __align__(1024) int8_t sa[8192], sb[8192];
    const int t = threadIdx.x, row = t / 2, j = t % 2;
    const uint32_t kdist = layout ? 1024 : 128, mdist = layout ? 128 : 256;
    const uint32_t off = (layout ? j * 1024 + (row / 8) * 128 : (row / 8) * 256 + j * 128) + (row % 8) * 16;
    int d[32];
    for (int i = 0; i < 32; i++) d[i] = 0;
    for (int k0 = 0; k0 < K; k0 += 32) {
        *(int4 *)(sa + off) = *(const int4 *)(A + row * K + k0 + 16 * j);
        *(int4 *)(sb + off) = *(const int4 *)(B + row * K + k0 + 16 * j);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");   /* generic writes before the async reads */
        __syncthreads();
        uint64_t da = smem_desc(smem_addr(sa), swap ? mdist : kdist, swap ? kdist : mdist);
        uint64_t db = smem_desc(smem_addr(sb), swap ? mdist : kdist, swap ? kdist : mdist);
        wg_fence();
        wgmma_s8_n64(d, da, db, k0 > 0);
        wg_commit();
        wg_wait0();
        __syncthreads();
    }
    const int w = t / 32, g = t % 32 / 4, tg = t % 4;
    for (int n8 = 0; n8 < 8; n8++) {
        int r = 16 * w + g, c = 8 * n8 + 2 * tg;
        C[r * 64 + c] = d[4 * n8], C[r * 64 + c + 1] = d[4 * n8 + 1];
        C[(r + 8) * 64 + c] = d[4 * n8 + 2], C[(r + 8) * 64 + c + 1] = d[4 * n8 + 3];
    }
}

/* iters m64n128k32 products a warpgroup on resident operands. */
__global__ void wgmma_peak(int iters, int *sink) {
    __shared__ __align__(1024) int8_t sa[64 * 32], sb[128 * 32];
    for (int i = threadIdx.x; i < 64 * 32 / 4; i += blockDim.x) ((int *)sa)[i] = i * 0x01030507;
    for (int i = threadIdx.x; i < 128 * 32 / 4; i += blockDim.x) ((int *)sb)[i] = i * 0x02040608;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    const uint64_t da = smem_desc(smem_addr(sa), 128, 256), db = smem_desc(smem_addr(sb), 128, 256);
    int d[64];
    for (int i = 0; i < 64; i++) d[i] = 0;
    wg_fence();
    for (int it = 0; it < iters; it += 4) {
        wgmma_s8_n128(d, da, db, 1);
        wgmma_s8_n128(d, da, db, 1);
        wgmma_s8_n128(d, da, db, 1);
        wgmma_s8_n128(d, da, db, 1);
        wg_commit();
    }
    wg_wait0();
    int s = 0;
    for (int i = 0; i < 64; i++) s ^= d[i];
    if (s == 0x12345678) sink[0] = s;
}

/* iters x 8 independent m16n8k32 products a warp on register operands. */
__global__ void mma_peak(int iters, int *sink) {
    uint32_t a0 = threadIdx.x, a1 = a0 * 3, a2 = a0 * 5, a3 = a0 * 7, b0 = a0 * 11, b1 = a0 * 13;
    int d[8][4] = {};
    for (int it = 0; it < iters; it++)
#pragma unroll
        for (int q = 0; q < 8; q++) mma_s8(d[q], a0, a1, a2, a3, b0, b1);
    int s = 0;
    for (int q = 0; q < 8; q++) s ^= d[q][0] ^ d[q][1] ^ d[q][2] ^ d[q][3];
    if (s == 0x12345678) sink[0] = s;
}

/* A failed call ends the probe with its name: a sticky error would make every
 * later figure meaningless. */
static void check(cudaError_t e, const char *what) {
    if (e != cudaSuccess) {
        printf("%s: %s\n", what, cudaGetErrorString(e));
        exit(1);
    }
}

int main() {
    setvbuf(stdout, NULL, _IONBF, 0); /* piped to tee: keep each line if the probe dies */
    const int K = 256;
    std::vector<int8_t> A(64 * K), B(64 * K);
    srand(7);
    for (auto &v : A) v = (int8_t)(rand() % 255 - 127);
    for (auto &v : B) v = (int8_t)(rand() % 255 - 127);
    std::vector<int> ref(64 * 64), got(64 * 64);
    for (int m = 0; m < 64; m++)
        for (int n = 0; n < 64; n++) {
            int s = 0;
            for (int k = 0; k < K; k++) s += A[m * K + k] * B[n * K + k];
            ref[m * 64 + n] = s;
        }
    int8_t *dA, *dB;
    int *dC, *sink;
    check(cudaMalloc(&dA, A.size()), "cudaMalloc A");
    check(cudaMalloc(&dB, B.size()), "cudaMalloc B");
    check(cudaMalloc(&dC, 64 * 64 * sizeof(int)), "cudaMalloc C");
    check(cudaMalloc(&sink, sizeof(int)), "cudaMalloc sink");
    check(cudaMemcpy(dA, A.data(), A.size(), cudaMemcpyHostToDevice), "copy A");
    check(cudaMemcpy(dB, B.data(), B.size(), cudaMemcpyHostToDevice), "copy B");
    printf("host reference done, operands on the GPU\n");
    for (int layout = 0; layout < 2; layout++)
        for (int swap = 0; swap < 2; swap++) {
            cudaMemset(dC, 0, 64 * 64 * sizeof(int));
            wgmma_check<<<1, 128>>>(dA, dB, K, dC, layout, swap);
            cudaError_t e = cudaDeviceSynchronize();
            check(e, "wgmma_check");
            check(cudaMemcpy(got.data(), dC, got.size() * sizeof(int), cudaMemcpyDeviceToHost), "copy C");
            int bad = 0, first = -1;
            for (int i = 0; i < 64 * 64; i++)
                if (got[i] != ref[i]) bad++, first = first < 0 ? i : first;
            printf("wgmma s8 layout %d (K-neighbours %4d B apart, row groups %4d), distances %s: %s", layout,
                   layout ? 1024 : 128, layout ? 128 : 256, swap ? "swapped" : "as named", cudaGetErrorString(e));
            if (bad) printf(", %d of 4096 wrong (first [%d][%d]: %d, want %d)\n", bad, first / 64, first % 64,
                            got[first], ref[first]);
            else printf(", all 4096 right\n");
        }
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    cudaEvent_t t0, t1;
    cudaEventCreate(&t0);
    cudaEventCreate(&t1);
    const int iters = 1 << 14;
    for (int per_sm : {1, 2, 3}) {
        wgmma_peak<<<sms * per_sm, 128>>>(64, sink);
        cudaEventRecord(t0);
        wgmma_peak<<<sms * per_sm, 128>>>(iters, sink);
        cudaEventRecord(t1);
        cudaEventSynchronize(t1);
        float ms = 0;
        cudaEventElapsedTime(&ms, t0, t1);
        double ops = 2.0 * 64 * 128 * 32 * iters * sms * per_sm;
        printf("wgmma m64n128k32 s8, %d warpgroups an SM: %.0f TOPS (%s)\n", per_sm, ops / ms / 1e9,
               cudaGetErrorString(cudaGetLastError()));
    }
    for (int warps : {4, 8, 16}) {
        mma_peak<<<sms, 32 * warps>>>(64, sink);
        cudaEventRecord(t0);
        mma_peak<<<sms, 32 * warps>>>(iters, sink);
        cudaEventRecord(t1);
        cudaEventSynchronize(t1);
        float ms = 0;
        cudaEventElapsedTime(&ms, t0, t1);
        double ops = 2.0 * 16 * 8 * 32 * 8 * (double)iters * sms * warps;
        printf("mma.sync m16n8k32 s8, %2d warps an SM, 8 chains each: %.0f TOPS (%s)\n", warps, ops / ms / 1e9,
               cudaGetErrorString(cudaGetLastError()));
    }
    return 0;
}
