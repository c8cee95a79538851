/*
 * lr-bench: the workload of the end-to-end benchmark (bench/e2e.ts). Like lr-workload it
 * fills private anonymous memory with the shared pattern (pattern.h) and judges the restore
 * itself, but after the trigger it first does what a real program would do right after a
 * restore, timed, and only then checks every word.
 *
 * Usage: lr-bench --mb N --mode seq|random|hotset|tree [--percent P] [--seed S]
 *                 --trigger FILE --result FILE
 *
 * Modes (what happens after the trigger):
 *   seq     reads and checks every page in address order; ws_ms = the scan.
 *   random  reads and checks P% (default 10) of the pages, chosen (without repeats) by a
 *           PRNG with a fixed seed; ws_ms = time until they are all done. Then checks
 *           everything.
 *   hotset  a hot set of P% (default 5) of the pages (fixed seed). Operations: read and check
 *           a random hot page, write the same values back. Before being dumped the process
 *           measures its own steady rate (steady_ops, ops/s over ~300 ms, all pages
 *           resident); after the trigger it runs operations for 2 s, counting them per
 *           100 ms (ops100), so "first 100 ms vs steady" needs no second run. ws_ms = time
 *           until every hot page was operated on at least once (the operation sequence is
 *           fixed by the seed, so this is the same amount of work in every run). Then checks
 *           everything.
 *   tree    the root forks 2 children before filling anything; each child holds N/2 MiB and
 *           does `random`; the root (role=parent, no benchmark memory) waits for them.
 *
 * Protocol with the harness (as lr-workload):
 *   - the root calls setsid(): a plain `criu dump -t ROOT` (no --shell-job) needs the dumped
 *     root to lead its session.
 *   - stdout: "pids <root> [<child>...]" then "ready <pid> <nprocs>" once every process has
 *     filled its memory (and, for hotset, measured its steady rate): from then on the tree
 *     may be dumped.
 *   - every process polls for --trigger every millisecond (never a signal: that works whatever
 *     the restored pids and never races criu's ptrace seize); the file must not exist at dump
 *     time. Times are measured from the moment a process sees it.
 *   - each process appends one line (one O_APPEND write) to --result:
 *     "mode=M role=R pid=P pages=N bad=B ws_bad=W ws_ms=T total_ms=T steady_ops=S ops100=a,b,...
 *      t0_rt_ns=N ok=1|0"
 *     (ops100 is "-" outside hotset; t0_rt_ns: CLOCK_REALTIME when the trigger was seen, the
 *     origin of ws_ms and total_ms, which are measured with CLOCK_MONOTONIC) and exits 0 only when its memory, and every child's, is
 *     correct.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pattern.h"

#define REGION 0          /* pattern region id of the benchmark memory */
#define HOT_RUN_MS 2000.0 /* hotset: operations after the trigger */
#define BUCKET_MS 100.0
#define NBUCKETS 20
#define STEADY_WARM_MS 50.0
#define STEADY_MS 300.0
#define WS_CAP_MS 120000.0 /* hotset: give up waiting for every hot page after this */
#define NCHILDREN 2

enum mode { SEQ, RANDOM, HOTSET, TREE };
static const char *mode_names[] = { "seq", "random", "hotset", "tree" };

static enum mode mode;
static const char *role = "root";
static uint32_t proc_index; /* 0 = root, 1..2 = tree children: part of the pattern */
static const char *trigger_path;
static const char *result_path;

static uint8_t *mem;       /* the benchmark memory */
static uint64_t npages;
static uint32_t *sel;      /* random: pages to touch; hotset: the hot set */
static uint64_t nsel;
static double steady_ops;  /* hotset: ops/s measured before the dump */

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* When this process saw the trigger, CLOCK_REALTIME ns, so the harness can time "restore
 * started -> working set". Not CLOCK_MONOTONIC: criu restores the tree into a time namespace
 * whose monotonic clock continues from the dump, so it is not the harness's. */
static uint64_t trigger_rt_ns;

static void die(const char *what)
{
	fprintf(stderr, "lr-bench[%d]: %s: %s\n", getpid(), what, strerror(errno));
	exit(2);
}

/* splitmix64: small, fast, and the same sequence on every run for a given seed. */
static uint64_t next_rand(uint64_t *s)
{
	uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static void *map_anon(size_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	return p;
}

/* Chooses nsel distinct pages out of npages (partial Fisher-Yates, fixed seed). The list
 * lives in its own mapping, dumped with the rest: after restore, reading it is part of the
 * program's working set, as it would be for a real program. */
static void choose_pages(double percent, uint64_t seed)
{
	nsel = (uint64_t)((double)npages * percent / 100.0);
	if (nsel < 1)
		nsel = 1;
	if (nsel > npages)
		nsel = npages;
	uint32_t *all = map_anon(npages * sizeof *all);
	for (uint64_t i = 0; i < npages; i++)
		all[i] = (uint32_t)i;
	uint64_t s = seed ^ ((uint64_t)proc_index << 32);
	for (uint64_t i = 0; i < nsel; i++) {
		uint64_t j = i + next_rand(&s) % (npages - i);
		uint32_t t = all[i];
		all[i] = all[j];
		all[j] = t;
	}
	sel = map_anon(nsel * sizeof *sel);
	memcpy(sel, all, nsel * sizeof *sel);
	munmap(all, npages * sizeof *all);
}

static int check_page(uint64_t i)
{
	return pattern_page_ok((const uint64_t *)(mem + i * PAGE), proc_index, REGION, i, 0);
}

/* One hotset operation on hot page number h: read and check it, write the same values back. */
static int hot_op(uint64_t h)
{
	uint64_t i = sel[h];
	uint64_t *w = (uint64_t *)(mem + i * PAGE);
	int ok = 1;
	for (uint64_t j = 0; j < WORDS; j++) {
		uint64_t want = pattern(proc_index, REGION, i, j);
		if (w[j] != want)
			ok = 0;
		w[j] = want;
	}
	return ok;
}

static uint64_t verify_all(void)
{
	uint64_t bad = 0;
	for (uint64_t i = 0; i < npages; i++)
		bad += !check_page(i);
	return bad;
}

static void measure_steady(uint64_t seed)
{
	uint64_t s = seed + 1; /* another sequence than the timed one */
	double t0 = now_ms(), start = 0;
	uint64_t ops = 0;
	for (;;) {
		for (int k = 0; k < 64; k++)
			hot_op(next_rand(&s) % nsel);
		double t = now_ms() - t0;
		if (!start && t >= STEADY_WARM_MS)
			start = t, ops = 0;
		else
			ops += 64;
		if (start && t - start >= STEADY_MS) {
			steady_ops = ops / ((t - start) / 1e3);
			return;
		}
	}
}

static void wait_trigger(void)
{
	struct stat st;
	struct timespec ms = { 0, 1000000 };
	while (stat(trigger_path, &st) != 0)
		nanosleep(&ms, NULL);
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	trigger_rt_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void report(uint64_t pages, uint64_t bad, uint64_t ws_bad, double ws_ms, double total_ms,
		   const uint64_t *ops100, int ok)
{
	char buckets[NBUCKETS * 24] = "-";
	if (ops100) {
		size_t o = 0;
		for (int b = 0; b < NBUCKETS; b++)
			o += (size_t)snprintf(buckets + o, sizeof buckets - o, "%s%llu", b ? "," : "",
					      (unsigned long long)ops100[b]);
	}
	char line[1024];
	int n = snprintf(line, sizeof line,
			 "mode=%s role=%s pid=%d pages=%llu bad=%llu ws_bad=%llu ws_ms=%.3f total_ms=%.3f "
			 "steady_ops=%.0f ops100=%s t0_rt_ns=%llu ok=%d\n",
			 mode_names[mode], role, getpid(), (unsigned long long)pages, (unsigned long long)bad,
			 (unsigned long long)ws_bad, ws_ms, total_ms, steady_ops, buckets,
			 (unsigned long long)trigger_rt_ns, ok);
	int fd = open(result_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open --result");
	if (write(fd, line, (size_t)n) != n) /* O_APPEND + one write: lines never interleave */
		die("write --result");
	close(fd);
}

/* After the trigger, in one process that owns benchmark memory. Returns 0 when all was well. */
static int run_after_trigger(enum mode m, uint64_t seed)
{
	double t0 = now_ms(), ws_ms = -1;
	uint64_t ws_bad = 0, bad;
	uint64_t ops100[NBUCKETS] = { 0 };
	int hot = m == HOTSET;

	if (m == SEQ) {
		bad = verify_all();
		ws_ms = now_ms() - t0;
		report(npages, bad, 0, ws_ms, ws_ms, NULL, bad == 0);
		return bad != 0;
	}
	if (m == RANDOM) {
		for (uint64_t k = 0; k < nsel; k++)
			ws_bad += !check_page(sel[k]);
		ws_ms = now_ms() - t0;
	} else { /* HOTSET */
		/* Which hot pages were operated on: fresh memory (not restored, not registered with
		 * userfaultfd), so keeping score costs no faults. */
		uint8_t *seen = map_anon(nsel);
		uint64_t nseen = 0;
		uint64_t s = seed;
		for (;;) {
			uint64_t idx = next_rand(&s) % nsel;
			ws_bad += !hot_op(idx);
			if (!seen[idx])
				seen[idx] = 1, nseen++;
			double t = now_ms() - t0;
			if (ws_ms < 0 && nseen == nsel)
				ws_ms = t;
			if (t < HOT_RUN_MS)
				ops100[(int)(t / BUCKET_MS)]++;
			else if (ws_ms >= 0 || t > WS_CAP_MS)
				break;
		}
		munmap(seen, nsel);
	}
	bad = verify_all();
	double total = now_ms() - t0;
	int ok = bad == 0 && ws_bad == 0 && ws_ms >= 0;
	report(npages, bad, ws_bad, ws_ms, total, hot ? ops100 : NULL, ok);
	return !ok;
}

int main(int argc, char **argv)
{
	size_t mb = 0;
	double percent = -1;
	uint64_t seed = 42;
	const char *mode_arg = NULL;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(a, "--mb") && v) mb = strtoul(v, NULL, 10), i++;
		else if (!strcmp(a, "--mode") && v) mode_arg = v, i++;
		else if (!strcmp(a, "--percent") && v) percent = strtod(v, NULL), i++;
		else if (!strcmp(a, "--seed") && v) seed = strtoull(v, NULL, 0), i++;
		else if (!strcmp(a, "--trigger") && v) trigger_path = v, i++;
		else if (!strcmp(a, "--result") && v) result_path = v, i++;
		else {
			fprintf(stderr, "lr-bench: unknown or incomplete argument '%s'\n"
				"usage: lr-bench --mb N --mode seq|random|hotset|tree [--percent P] [--seed S] "
				"--trigger FILE --result FILE\n", a);
			return 2;
		}
	}
	int found = 0;
	for (int k = 0; mode_arg && k < 4; k++)
		if (!strcmp(mode_arg, mode_names[k]))
			mode = (enum mode)k, found = 1;
	if (!found || !trigger_path || !result_path || mb == 0 || (mode == TREE && mb < 2)) {
		fprintf(stderr, "lr-bench: --mb N (N > 0, >= 2 for tree), --mode seq|random|hotset|tree, "
			"--trigger FILE and --result FILE are required\n");
		return 2;
	}
	if (percent < 0)
		percent = mode == HOTSET ? 5 : 10;
	if (percent <= 0 || percent > 100) {
		fprintf(stderr, "lr-bench: --percent must be in (0, 100]\n");
		return 2;
	}

	/* A session of our own: criu dump refuses a root that is not a session leader (without
	 * --shell-job). lr-reaper may have made us one already. */
	if (getsid(0) != getpid() && setsid() < 0)
		die("setsid");

	/* tree: the children first, so each fills its own memory with its own index. */
	int ready_pipe[2];
	if (pipe(ready_pipe))
		die("pipe");
	pid_t kids[NCHILDREN];
	int nkids = mode == TREE ? NCHILDREN : 0;
	enum mode work = mode == TREE ? RANDOM : mode;
	for (int c = 0; c < nkids; c++) {
		pid_t p = fork();
		if (p < 0)
			die("fork");
		if (p == 0) {
			proc_index = (uint32_t)c + 1;
			role = "child";
			nkids = 0;
			break;
		}
		kids[c] = p;
	}
	int owns_memory = mode != TREE || proc_index != 0;
	if (mode == TREE && proc_index == 0)
		role = "parent";

	if (owns_memory) {
		npages = (uint64_t)mb * 256 / (mode == TREE ? 2 : 1);
		mem = map_anon(npages * PAGE);
		for (uint64_t i = 0; i < npages; i++)
			pattern_fill_page((uint64_t *)(mem + i * PAGE), proc_index, REGION, i);
		if (work != SEQ)
			choose_pages(percent, seed);
		if (work == HOTSET)
			measure_steady(seed);
	}

	if (proc_index) {
		close(ready_pipe[0]);
		if (write(ready_pipe[1], "r", 1) != 1)
			die("write ready");
		close(ready_pipe[1]);
	} else {
		close(ready_pipe[1]);
		char b;
		for (int c = 0; c < nkids; c++)
			if (read(ready_pipe[0], &b, 1) != 1)
				die("read ready");
		close(ready_pipe[0]);
		printf("pids %d", getpid());
		for (int c = 0; c < nkids; c++)
			printf(" %d", kids[c]);
		printf("\nready %d %d\n", getpid(), nkids + 1);
		fflush(stdout);
	}

	wait_trigger();
	double t0 = now_ms();
	int fail = 0;
	if (owns_memory)
		fail |= run_after_trigger(work, seed);
	if (nkids) {
		for (int c = 0; c < nkids; c++) {
			int st;
			if (waitpid(kids[c], &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
				fail = 1;
		}
		double t = now_ms() - t0;
		report(0, 0, 0, t, t, NULL, !fail);
	}
	return fail;
}
