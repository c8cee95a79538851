/*
 * pattern.h: the memory pattern shared by lr-workload (correctness) and lr-bench
 * (benchmarks). Every 64-bit word's value depends only on (process index, region id, page
 * index, word index), never on its address, so a restored process can check any page it
 * owns on its own, and a page that moved (mremap) keeps its expected content.
 */
#ifndef LR_PATTERN_H
#define LR_PATTERN_H

#include <stddef.h>
#include <stdint.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)

static inline uint64_t pattern(uint32_t proc, uint32_t region, uint64_t page, uint64_t word)
{
	uint64_t x = ((uint64_t)proc << 56) ^ ((uint64_t)region << 48) ^ (page << 9) ^ word;
	x ^= x >> 31;
	x *= 0x9E3779B97F4A7C15ULL;
	x ^= x >> 29;
	return x | 1; /* never zero: a zero-filled page can never pass as data */
}

/* Writes the pattern of (proc, region, page) into the page at w. */
static inline void pattern_fill_page(uint64_t *w, uint32_t proc, uint32_t region, uint64_t page)
{
	for (uint64_t j = 0; j < WORDS; j++)
		w[j] = pattern(proc, region, page, j);
}

/* 1 when every word of the page at w holds what it should: zeros if expect_zero, else the
 * pattern of (proc, region, page). Stops at the first wrong word. */
static inline int pattern_page_ok(const uint64_t *w, uint32_t proc, uint32_t region, uint64_t page, int expect_zero)
{
	for (uint64_t j = 0; j < WORDS; j++) {
		uint64_t want = expect_zero ? 0 : pattern(proc, region, page, j);
		if (w[j] != want)
			return 0;
	}
	return 1;
}

/* 1 when every word of the page is zero (data replaced by zeros: what a dead daemon leaves). */
static inline int page_all_zero(const uint64_t *w)
{
	for (uint64_t j = 0; j < WORDS; j++)
		if (w[j] != 0)
			return 0;
	return 1;
}

#endif
