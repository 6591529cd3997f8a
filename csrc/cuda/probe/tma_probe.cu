/* How fast one SM's TMA takes raw bulk copies (cp.async.bulk, global ->
 * shared) by copy size: the question the twenty-seventh session's shared-
 * memory ring left (cuda/NOTES.md). A block an SM streams its own stretch of
 * a 2 GiB buffer (far past L2) through a ring of 8 stages of 16 KB, each
 * stage STAGE / size copies issued by one lane or by 32, waiting only before
 * a slot is reused (nothing reads the data: the copy engine alone). Beside
 * it, the same bytes read by plain 16-byte loads, the rate to compare with.
 * Run by `device_run.sh tma-probe` (sm_90; not part of the library build,
 * which takes csrc/cuda/*.cu only). */
#include <cstdint>
#include <cstdio>

#define RING 8
#define STAGE (16 * 1024)

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect(uint32_t bar, int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

__device__ __forceinline__ void bulk_copy(uint32_t dst, const void *src, int bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

/* One warp a block: per_block bytes from src + block * per_block, copies of
 * `size` bytes issued by lanes 0 .. lanes - 1. */
__global__ void bulk_stream(const uint8_t *src, int64_t per_block, int size, int lanes) {
    extern __shared__ __align__(128) uint8_t sh[];
    const uint32_t ring = (uint32_t)__cvta_generic_to_shared(sh), bars = ring + RING * STAGE;
    const int lane = threadIdx.x;
    if (lane == 0) {
        for (int i = 0; i < RING; i++) mbar_init(bars + 8 * i, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    const uint8_t *base = src + blockIdx.x * per_block;
    const int stages = (int)(per_block / STAGE), copies = STAGE / size;
    for (int j = 0; j < stages; j++) {
        const int slot = j % RING;
        if (j >= RING) mbar_wait(bars + 8 * slot, (j / RING - 1) & 1);
        if (lane == 0) mbar_arrive_expect(bars + 8 * slot, STAGE);
        __syncwarp();
        if (lane < lanes)
            for (int c = lane; c < copies; c += lanes)
                bulk_copy(ring + slot * STAGE + c * size, base + (int64_t)j * STAGE + c * size, size, bars + 8 * slot);
        __syncwarp();
    }
    for (int j = stages > RING ? stages - RING : 0; j < stages; j++) mbar_wait(bars + 8 * (j % RING), (j / RING) & 1);
}

/* The same bytes by 16-byte loads, 1,024 threads a block (sum kept live). */
__global__ void plain_stream(const uint8_t *src, int64_t per_block, unsigned *sink) {
    const uint4 *p = (const uint4 *)(src + blockIdx.x * per_block);
    unsigned acc = 0;
    for (int64_t i = threadIdx.x; i < per_block / 16; i += blockDim.x) {
        uint4 v = __ldcs(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) sink[0] = acc;
}

int main() {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    const int64_t total = (int64_t)2 << 30;
    const int64_t per_block = total / sms / STAGE * STAGE;
    uint8_t *src;
    unsigned *sink;
    if (cudaMalloc(&src, total) != cudaSuccess || cudaMalloc(&sink, 4) != cudaSuccess) {
        printf("tma_probe: cudaMalloc failed\n");
        return 1;
    }
    cudaMemset(src, 1, total);
    cudaFuncSetAttribute(bulk_stream, cudaFuncAttributeMaxDynamicSharedMemorySize, RING * STAGE + 8 * RING);
    cudaEvent_t t0, t1;
    cudaEventCreate(&t0);
    cudaEventCreate(&t1);
    const double bytes = (double)per_block * sms;
    auto timed = [&](auto launch) {
        launch();   /* warm */
        cudaEventRecord(t0);
        launch();
        cudaEventRecord(t1);
        cudaEventSynchronize(t1);
        float ms = 0;
        cudaEventElapsedTime(&ms, t0, t1);
        return (double)ms;
    };
    double ms = timed([&] { plain_stream<<<sms, 1024>>>(src, per_block, sink); });
    printf("%d SMs, %.2f GiB a pass\nplain 16-byte loads: %.0f GB/s\n", sms, bytes / (1 << 30), bytes / ms / 1e6);
    printf("copy bytes, issuing lanes: GB/s, copies a us an SM\n");
    for (int lanes : {1, 32})
        for (int size : {64, 128, 256, 512, 1024, 2048, 4096, 16384}) {
            ms = timed([&] { bulk_stream<<<sms, 32, RING * STAGE + 8 * RING>>>(src, per_block, size, lanes); });
            double copies = bytes / size;
            printf("%6d B, %2d lanes: %6.0f GB/s, %6.1f\n", size, lanes, bytes / ms / 1e6, copies / sms / (ms * 1e3));
        }
    printf("tma_probe: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
    return 0;
}
