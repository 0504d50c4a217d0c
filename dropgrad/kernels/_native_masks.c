/*
 * dropgrad's native CPU kernel for keyed Bernoulli masks.
 *
 * One pass over each gradient: for every element, hash its word, compare its
 * 16-bit lane with the threshold, clear the element's bits when it is dropped
 * and multiply it by the survivor factor. The result is bit-for-bit the one the
 * torch-op path and the reference path in kernels/_reference.py compute:
 *
 *   word w of a stream (a, b) = lowbias32(b + a * w mod 2**32)
 *   element g reads lane g & 1 of word g >> 1 (the low 16 bits for even g)
 *   dropped when (lane ^ 0x8000) < threshold; every element is then
 *   multiplied by factor, rounded to the element's dtype as torch's
 *   tensor.mul_(python_float) does (float32: the factor as float, float32
 *   product; float64: double product).
 *
 * Dropped elements have their bits cleared (+0) before the multiplication, as
 * the torch path does, so NaN and inf gradients are dropped to zero too.
 *
 * The file is compiled on first use by dropgrad/kernels/_native.py with
 * -O3 -march=native, which lets the compiler vectorize the loops (the 32-bit
 * multiplies need SSE4.1 or better to vectorize), and -fopenmp where the
 * compiler takes it. Each word is hashed once for the two elements that read
 * it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DROPGRAD_NATIVE_ABI 4

enum { DTYPE_FLOAT32 = 0, DTYPE_FLOAT64 = 1 };

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= UINT32_C(0x7FEB352D);
    x ^= x >> 15;
    x *= UINT32_C(0x846CA68B);
    x ^= x >> 16;
    return x;
}

/* Lane value in [0, 65536) with the top bit flipped, as the torch path compares it. */
static inline uint32_t lane_of(uint32_t word, uint64_t element) {
    uint32_t lane = (element & 1) ? (word >> 16) : (word & 0xFFFFu);
    return lane ^ 0x8000u;
}

/*
 * Whole words are hashed BLOCK_WORDS at a time into a buffer on the stack, and
 * their 16-bit halves are then read as the lanes of consecutive elements. On a
 * little-endian machine the halves of word j already lie in element order (the
 * low half, element 2j, first), so the buffer is reinterpreted by a copy, not
 * shuffled. Each loop is then a plain one over contiguous arrays, which
 * compilers vectorize well: about twice as fast as one loop that hashes a word
 * and writes its two elements, which needs a shuffle per word. 64 words (256
 * bytes of words, 256 of lanes) was the fastest block measured; the buffers
 * stay in L1.
 *
 * With a lane read as int16_t s (= lane - 65536 for lane >= 0x8000),
 * (lane ^ 0x8000) < threshold  <=>  s < threshold - 32768, one signed compare.
 */
#define BLOCK_WORDS 64

static void fill_lanes(int16_t *lanes, int64_t words, uint32_t first_word, uint32_t a,
                       uint32_t b) {
    uint32_t hashed[BLOCK_WORDS];
    for (int64_t j = 0; j < words; j++) {
        hashed[j] = lowbias32(b + a * (first_word + (uint32_t)j));
    }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    for (int64_t j = 0; j < words; j++) {
        lanes[2 * j] = (int16_t)(uint16_t)(hashed[j] & 0xFFFFu);
        lanes[2 * j + 1] = (int16_t)(uint16_t)(hashed[j] >> 16);
    }
#else
    memcpy(lanes, hashed, (size_t)words * sizeof hashed[0]);
#endif
}

/*
 * MASK_KERNEL(NAME, T, U, S): mask n consecutive elements of type T (bits of
 * unsigned type U, factor of type S) whose first element has global index start.
 */
#define MASK_KERNEL(NAME, T, U, S)                                                     \
    static void NAME##_one(T *p, uint64_t g, uint32_t a, uint32_t b,                   \
                           uint32_t threshold, S factor) {                             \
        uint32_t word = lowbias32(b + a * (uint32_t)(g >> 1));                         \
        U bits;                                                                         \
        memcpy(&bits, p, sizeof bits);                                                  \
        bits &= lane_of(word, g) < threshold ? (U)0 : (U)~(U)0;                         \
        T value;                                                                        \
        memcpy(&value, &bits, sizeof value);                                            \
        *p = value * factor;                                                            \
    }                                                                                   \
    static void NAME(T *p, int64_t n, uint64_t start, uint32_t a, uint32_t b,          \
                     uint32_t threshold, S factor) {                                   \
        int64_t i = 0;                                                                  \
        if (n > 0 && (start & 1)) { /* high half of a word: on its own */              \
            NAME##_one(p, start, a, b, threshold, factor);                              \
            i = 1;                                                                      \
        }                                                                               \
        const uint32_t first_word = (uint32_t)((start + (uint64_t)i) >> 1);            \
        const int64_t pairs = (n - i) / 2;                                              \
        const int32_t limit = (int32_t)threshold - 32768;                               \
        int16_t lanes[2 * BLOCK_WORDS];                                                 \
        for (int64_t done = 0; done < pairs; done += BLOCK_WORDS) {                     \
            const int64_t words =                                                       \
                pairs - done < BLOCK_WORDS ? pairs - done : BLOCK_WORDS;                \
            fill_lanes(lanes, words, first_word + (uint32_t)done, a, b);                \
            T *q = p + i + 2 * done;                                                    \
            for (int64_t k = 0; k < 2 * words; k++) {                                   \
                U bits;                                                                 \
                memcpy(&bits, &q[k], sizeof bits);                                      \
                bits &= (int32_t)lanes[k] < limit ? (U)0 : (U)~(U)0;                    \
                T value;                                                                \
                memcpy(&value, &bits, sizeof value);                                    \
                q[k] = value * factor;                                                  \
            }                                                                           \
        }                                                                               \
        i += 2 * pairs;                                                                 \
        if (i < n) { /* a last element in the low half of its word */                  \
            NAME##_one(p + i, start + (uint64_t)i, a, b, threshold, factor);           \
        }                                                                               \
    }

MASK_KERNEL(mask_float32, float, uint32_t, float)
MASK_KERNEL(mask_float64, double, uint64_t, double)

int dropgrad_native_abi(void) { return DROPGRAD_NATIVE_ABI; }

/* Whether the parts of a call run in parallel: built with OpenMP. */
int dropgrad_native_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/*
 * Mask elements [lo, hi) of the concatenation of the count tensors. A tensor
 * cut by lo or hi is masked from its cut on, with its address and first global
 * index moved by the same offset: a mask is a function of the global index
 * alone, so a piece gets exactly the bits the whole tensor would.
 */
static void mask_range(int32_t dtype, int64_t count, const uint64_t *pointers,
                       const int64_t *sizes, const int64_t *starts, const int64_t *keys,
                       uint32_t threshold, double factor, int64_t lo, int64_t hi) {
    int64_t begin = 0; /* where tensor t begins in the concatenation */
    for (int64_t t = 0; t < count && begin < hi; begin += sizes[t], t++) {
        const int64_t from = lo > begin ? lo - begin : 0;
        const int64_t to = hi < begin + sizes[t] ? hi - begin : sizes[t];
        if (from >= to) {
            continue;
        }
        const uint32_t a = (uint32_t)keys[2 * t];
        const uint32_t b = (uint32_t)keys[2 * t + 1];
        const uint64_t start = (uint64_t)starts[t] + (uint64_t)from;
        if (dtype == DTYPE_FLOAT32) {
            mask_float32((float *)(uintptr_t)pointers[t] + from, to - from, start, a, b,
                         threshold, (float)factor);
        } else {
            mask_float64((double *)(uintptr_t)pointers[t] + from, to - from, start, a, b,
                         threshold, factor);
        }
    }
}

/*
 * Mask count tensors in place. Tensor t is contiguous, holds sizes[t]
 * elements at address pointers[t], its first element has global index
 * starts[t], and its stream key is keys[2 t] (the odd multiplier a) and
 * keys[2 t + 1] (the offset b), both in [0, 2**32).
 *
 * The elements are cut into `parts` runs of nearly equal length, masked on up
 * to `threads` threads when the library is built with OpenMP (one after
 * another without). Built by gcc, the library asks for libgomp.so.1, and the
 * dynamic loader hands it the copy torch has already loaded, so the runs go to
 * torch's own OpenMP threads: a pool of threads of our own would compete for
 * the cores with torch's threads, which spin for a while after each parallel
 * op (measured: slower than one thread right after a torch op).
 *
 * Returns 0, or -1 for a dtype code this kernel does not handle (nothing is
 * changed then).
 */
int dropgrad_bernoulli(int32_t dtype, int64_t count, const uint64_t *pointers,
                       const int64_t *sizes, const int64_t *starts, const int64_t *keys,
                       uint32_t threshold, double factor, int32_t parts,
                       int32_t threads) {
    if (dtype != DTYPE_FLOAT32 && dtype != DTYPE_FLOAT64) {
        return -1;
    }
    int64_t total = 0;
    for (int64_t t = 0; t < count; t++) {
        total += sizes[t];
    }
    const int64_t n = parts > 1 ? parts : 1;
    const int64_t share = total / n, extra = total % n;
    const int team = (int)(threads < 1 ? 1 : threads < n ? threads : n);
#ifdef _OPENMP
#pragma omp parallel for num_threads(team) schedule(static, 1) if (team > 1)
#else
    (void)team;
#endif
    for (int64_t k = 0; k < n; k++) {
        /* Part k: elements [k share + min(k, extra), (k + 1) share + min(k + 1, extra)). */
        const int64_t lo = k * share + (k < extra ? k : extra);
        const int64_t hi = lo + share + (k < extra ? 1 : 0);
        mask_range(dtype, count, pointers, sizes, starts, keys, threshold, factor, lo, hi);
    }
    return 0;
}

/* SplitMix64's output function of x + golden gamma, as dropgrad._random.splitmix64. */
static uint64_t splitmix64(uint64_t x) {
    uint64_t z = x + UINT64_C(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/*
 * dropgrad_bernoulli with the keys derived here rather than read from a table:
 * tensor t's key is splitmix64(step_key ^ positions[t]), its a the low 32 bits
 * with the lowest set and its b the high 32 bits, as stream_key() in
 * dropgrad/_random.py computes them (step_key is StreamKeys.step_key()).
 *
 * Returns as dropgrad_bernoulli does, or -2 when the key table could not be
 * allocated (nothing is changed then).
 */
int dropgrad_bernoulli_keyed(int32_t dtype, int64_t count, const uint64_t *pointers,
                             const int64_t *sizes, const int64_t *starts,
                             const uint64_t *positions, uint64_t step_key,
                             uint32_t threshold, double factor, int32_t parts,
                             int32_t threads) {
    int64_t *keys = malloc((size_t)(count > 0 ? count : 1) * 2 * sizeof *keys);
    if (keys == NULL) {
        return -2;
    }
    for (int64_t t = 0; t < count; t++) {
        const uint64_t key = splitmix64(step_key ^ positions[t]);
        keys[2 * t] = (int64_t)((key & UINT64_C(0xFFFFFFFF)) | 1u);
        keys[2 * t + 1] = (int64_t)(key >> 32);
    }
    const int code = dropgrad_bernoulli(dtype, count, pointers, sizes, starts, keys, threshold,
                                        factor, parts, threads);
    free(keys);
    return code;
}
