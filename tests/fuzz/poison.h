/*
 * poison.h — POISON/UNPOISON a byte range for AddressSanitizer, so that a
 * fuzz target can mark memory the code under test must not read (a no-op
 * without ASan).
 */
#ifndef PB_FUZZ_POISON_H
#define PB_FUZZ_POISON_H

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/asan_interface.h>
#define POISON(p, n)   ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#endif
#endif
#ifndef POISON
#define POISON(p, n)   ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#endif /* PB_FUZZ_POISON_H */
