/* The machine's bf16 arithmetic peak, to set beside the GFLOP/s engine_bench and compare_bench
 * print for the bare model: one thread per core, each a loop of 16 independent 512-bit VDPBF16PS
 * (16 lanes x 2 products x multiply and add = 64 FLOP each), which is what OpenVINO's bf16
 * convolutions run on a CPU with AVX512_BF16 and no AMX.
 *
 *     gcc -O2 -mavx512f -mavx512bf16 -pthread bench/bf16_peak.c -o /tmp/bf16_peak && /tmp/bf16_peak
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 200000000L
#define ALL(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
/* Distinct starting values, hidden from the compiler, so it cannot fold the 16 chains into one. */
#define START(k) __m512 acc##k = _mm512_set1_ps(k); __asm__ volatile("" : "+v"(acc##k));
#define STEP(k) acc##k = _mm512_dpbf16_ps(acc##k, x, y);
#define SUM(k) sum += _mm512_reduce_add_ps(acc##k);

static void *run(void *result) {
    ALL(START)
    __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3f80);
    for (long i = 0; i < ROUNDS; i++) {
        ALL(STEP)
        __asm__ volatile("" : "+v"(x));
    }
    float sum = 0;
    ALL(SUM)
    *(float *)result = sum;
    return NULL;
}

int main(void) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    pthread_t threads[256];
    float results[256];
    struct timespec start, end;
    if (cores > 256) cores = 256;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long c = 0; c < cores; c++) pthread_create(&threads[c], NULL, run, &results[c]);
    for (long c = 0; c < cores; c++) pthread_join(threads[c], NULL);
    clock_gettime(CLOCK_MONOTONIC, &end);
    double seconds = (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9;
    double flop = 16.0 * 64 * ROUNDS * cores;
    printf("%ld cores: %.0f GFLOP/s bf16 (%.0f per core)\n", cores, flop / seconds / 1e9, flop / seconds / 1e9 / cores);
    return results[0] == 0;  /* uses the sums, so the loops are not optimised away */
}
