/*
 * dropgrad's native CPU kernel for keyed Bernoulli masks.
 *
 * One pass over each gradient: for every element, hash its word, compare its
 * 16-bit lane with the threshold, clear the element's bits when it is dropped
 * and multiply it by the survivor factor. The result is bit-for-bit the one the
 * torch-op path and the plain reference path in _masking.py compute:
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
 * The file is compiled on first use by dropgrad/_native.py with
 * -O3 -march=native, which lets the compiler vectorize the loops (the 32-bit
 * multiplies need SSE4.1 or better to vectorize). The pair loop handles two
 * elements per word so that each word is hashed once.
 */
#include <stdint.h>
#include <string.h>

#define DROPGRAD_NATIVE_ABI 1

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
    static void NAME(T *p, int64_t n, uint64_t start, uint32_t a, uint32_t b, \
                     uint32_t threshold, S factor) {                                   \
        int64_t i = 0;                                                                  \
        if (n > 0 && (start & 1)) { /* high half of a word: on its own */              \
            NAME##_one(p, start, a, b, threshold, factor);                              \
            i = 1;                                                                      \
        }                                                                               \
        const uint32_t first_word = (uint32_t)((start + (uint64_t)i) >> 1);            \
        const int64_t pairs = (n - i) / 2;                                              \
        T *q = p + i;                                                                   \
        for (int64_t j = 0; j < pairs; j++) {                                           \
            uint32_t word = lowbias32(b + a * (first_word + (uint32_t)j));              \
            U keep_low = ((word & 0xFFFFu) ^ 0x8000u) < threshold ? (U)0 : (U)~(U)0;    \
            U keep_high = ((word >> 16) ^ 0x8000u) < threshold ? (U)0 : (U)~(U)0;       \
            U low, high;                                                                \
            memcpy(&low, &q[2 * j], sizeof low);                                        \
            memcpy(&high, &q[2 * j + 1], sizeof high);                                  \
            low &= keep_low;                                                            \
            high &= keep_high;                                                          \
            T vlow, vhigh;                                                              \
            memcpy(&vlow, &low, sizeof vlow);                                           \
            memcpy(&vhigh, &high, sizeof vhigh);                                        \
            q[2 * j] = vlow * factor;                                                   \
            q[2 * j + 1] = vhigh * factor;                                              \
        }                                                                               \
        i += 2 * pairs;                                                                 \
        if (i < n) { /* a last element in the low half of its word */                  \
            NAME##_one(p + i, start + (uint64_t)i, a, b, threshold, factor);           \
        }                                                                               \
    }

MASK_KERNEL(mask_float32, float, uint32_t, float)
MASK_KERNEL(mask_float64, double, uint64_t, double)

int dropgrad_native_abi(void) { return DROPGRAD_NATIVE_ABI; }

/*
 * Mask count tensors in place. Tensor t is contiguous, holds sizes[t]
 * elements at address pointers[t], its first element has global index
 * starts[t], and its stream key is keys[2 t] (the odd multiplier a) and
 * keys[2 t + 1] (the offset b), both in [0, 2**32).
 *
 * Returns 0, or -1 for a dtype code this kernel does not handle (nothing is
 * changed then).
 */
int dropgrad_bernoulli(int32_t dtype, int64_t count, const uint64_t *pointers,
                       const int64_t *sizes, const int64_t *starts, const int64_t *keys,
                       uint32_t threshold, double factor) {
    if (dtype != DTYPE_FLOAT32 && dtype != DTYPE_FLOAT64) {
        return -1;
    }
    for (int64_t t = 0; t < count; t++) {
        const uint32_t a = (uint32_t)keys[2 * t];
        const uint32_t b = (uint32_t)keys[2 * t + 1];
        const uint64_t start = (uint64_t)starts[t];
        if (dtype == DTYPE_FLOAT32) {
            mask_float32((float *)(uintptr_t)pointers[t], sizes[t], start, a, b, threshold,
                         (float)factor);
        } else {
            mask_float64((double *)(uintptr_t)pointers[t], sizes[t], start, a, b, threshold,
                         factor);
        }
    }
    return 0;
}
