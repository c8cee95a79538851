/*
 * lr-workload: the process lazy-restore checkpoints and restores in its tests, demo and
 * benchmarks. It fills private anonymous memory with a pattern that depends only on
 * (process index, region, page, word), waits to be checkpointed, and after restore checks
 * every word of every page it owns, so a restore is judged by the process itself.
 *
 * Usage: lr-workload --mb N [--holes] [--threads T] [--children C] [--post-ops]
 *                    --trigger FILE --result FILE [--trigger-signal]
 *
 * Protocol with the harness:
 *   - stdout gets "region <pid> <k> <addr> <pages>" for every region each process filled,
 *     then "ready <pid> <nprocs>" once every process of the tree has filled its
 *     memory; from then on the tree may be dumped.
 *   - every process polls for FILE (--trigger) every millisecond; it must not exist at dump
 *     time. Polling (rather than a signal) works whatever pid the restored task has and
 *     never races criu's ptrace seize. With --trigger-signal, SIGUSR1 works too.
 *   - SIGUSR2 makes a process rewrite every fourth page of its first region with the same
 *     values (soft-dirty, for pre-dump + incremental dump tests) and print "dirtied <pid>".
 *   - after the trigger each process verifies its memory and appends one line to
 *     --result: "role=R index=I pid=P pages=N bad=B zero_bad=Z ms=T ok=1|0"; exit status
 *     is 0 only when its own memory and every child's are correct.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
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

#define MAX_REGIONS 64

struct region {
	uint8_t *addr;     /* where it is mapped now */
	size_t pages;
	uint32_t id;       /* pattern id: independent of address, so mremap keeps it valid */
	uint32_t first;    /* index of addr's first page in the original region */
	int holes;         /* pages (i % 64) == 62 read-faulted only, == 63 never touched */
	int zero;          /* expected to read back as zeros (after MADV_DONTNEED) */
};

static struct region regions[MAX_REGIONS];
static int nregions;
static int proc_index;           /* 0 = root, 1..C = children */
static const char *role = "root";
static const char *trigger_path;
static const char *result_path;
static volatile sig_atomic_t triggered;
static volatile sig_atomic_t dirty_req;

static int is_hole(const struct region *r, uint64_t page)
{
	return r->holes && (page % 64 == 62 || page % 64 == 63);
}

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void die(const char *what)
{
	fprintf(stderr, "lr-workload[%d]: %s: %s\n", getpid(), what, strerror(errno));
	exit(2);
}

static struct region *add_region(size_t pages, int holes)
{
	if (nregions == MAX_REGIONS) {
		errno = ENOSPC;
		die("too many regions");
	}
	uint8_t *p = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	struct region *r = &regions[nregions];
	*r = (struct region){ .addr = p, .pages = pages, .id = (uint32_t)nregions, .holes = holes };
	nregions++;
	volatile uint8_t sink = 0;
	for (uint64_t i = 0; i < pages; i++) {
		uint64_t *w = (uint64_t *)(p + i * PAGE);
		if (holes && i % 64 == 63)
			continue;              /* never touched: not in the pagemap */
		if (holes && i % 64 == 62) {
			sink += *(volatile uint8_t *)w; /* read fault: maps the zero page, not dumped */
			continue;
		}
		pattern_fill_page(w, (uint32_t)proc_index, r->id, i);
	}
	(void)sink;
	return r;
}

/* Checks every word of every page of every region; returns the number of bad pages. */
static uint64_t verify_all(uint64_t *pages_out, uint64_t *zero_bad_out)
{
	uint64_t bad = 0, zero_bad = 0, pages = 0;
	for (int k = 0; k < nregions; k++) {
		struct region *r = &regions[k];
		if (!r->addr)
			continue;
		for (uint64_t i = 0; i < r->pages; i++) {
			const uint64_t *w = (const uint64_t *)(r->addr + i * PAGE);
			uint64_t orig = r->first + i;
			int expect_zero = r->zero || is_hole(r, orig);
			if (!pattern_page_ok(w, (uint32_t)proc_index, r->id, orig, expect_zero)) {
				bad++;
				if (!expect_zero)
					zero_bad += page_all_zero(w); /* data replaced by zeros: what a dead daemon leaves */
			}
			pages++;
		}
	}
	*pages_out = pages;
	*zero_bad_out = zero_bad;
	return bad;
}

static void report(uint64_t pages, uint64_t bad, uint64_t zero_bad, double ms)
{
	char line[256];
	int n = snprintf(line, sizeof line, "role=%s index=%d pid=%d pages=%llu bad=%llu zero_bad=%llu ms=%.1f ok=%d\n",
			 role, proc_index, getpid(), (unsigned long long)pages, (unsigned long long)bad,
			 (unsigned long long)zero_bad, ms, bad == 0);
	int fd = open(result_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open --result");
	if (write(fd, line, (size_t)n) != n) /* O_APPEND + one write: lines never interleave */
		die("write --result");
	close(fd);
}

static void on_usr1(int sig)
{
	(void)sig;
	triggered = 1;
}

static void on_usr2(int sig)
{
	(void)sig;
	dirty_req = 1;
}

/* Rewrites every fourth page of the first region with the values it already holds: the
 * content stays predictable, but the kernel's soft-dirty bits mark those pages changed, so
 * an incremental dump after a pre-dump writes them anew and points the rest at the parent. */
static void redirty(void)
{
	struct region *r = &regions[0];
	for (uint64_t i = 0; i < r->pages; i += 4) {
		if (is_hole(r, i))
			continue;
		pattern_fill_page((uint64_t *)(r->addr + i * PAGE), (uint32_t)proc_index, r->id, i);
	}
	printf("dirtied %d\n", getpid());
	fflush(stdout);
}

static void wait_trigger(void)
{
	struct stat st;
	struct timespec ms = { 0, 1000000 };
	while (!triggered && stat(trigger_path, &st) != 0) {
		if (dirty_req) {
			dirty_req = 0;
			redirty();
		}
		nanosleep(&ms, NULL);
	}
}

static void *idle_thread(void *arg)
{
	(void)arg;
	for (;;)
		pause();
	return NULL;
}

/* After restore: change the address space in every way userfaultfd reports (fork, mremap,
 * munmap, MADV_DONTNEED) while pages are still missing, then let verify_all judge. */
static int post_restore_ops(void)
{
	struct region *r = &regions[0];
	size_t q = r->pages / 8;
	if (q < 4)
		return 0;

	pid_t child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		role = "forked";
		uint64_t pages, zb;
		double t0 = now_ms();
		uint64_t bad = verify_all(&pages, &zb);
		report(pages, bad, zb, now_ms() - t0);
		_exit(bad ? 1 : 0);
	}

	/* mremap the second eighth to a fresh address: its pattern must follow it. */
	uint8_t *src = r->addr + q * PAGE;
	uint8_t *hint = mmap(NULL, q * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (hint == MAP_FAILED)
		die("mmap hint");
	uint8_t *moved = mremap(src, q * PAGE, q * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, hint);
	if (moved == MAP_FAILED)
		die("mremap");
	/* the third eighth goes away entirely */
	if (munmap(r->addr + 2 * q * PAGE, q * PAGE))
		die("munmap");
	/* the fourth eighth is dropped: it must read back as zeros */
	if (madvise(r->addr + 3 * q * PAGE, q * PAGE, MADV_DONTNEED))
		die("madvise");

	/* Split region 0 into what is left, so verify_all checks each piece where it now is. */
	size_t total = r->pages;
	struct region base = *r;
	r->pages = q;                                   /* [0, q): untouched */
	struct region *m = &regions[nregions++];
	*m = base;
	m->addr = moved, m->pages = q, m->first = q;    /* [q, 2q): moved */
	struct region *z = &regions[nregions++];
	*z = base;
	z->addr = base.addr + 3 * q * PAGE, z->pages = q, z->first = 3 * q, z->zero = 1;
	struct region *rest = &regions[nregions++];
	*rest = base;
	rest->addr = base.addr + 4 * q * PAGE, rest->pages = total - 4 * q, rest->first = 4 * q;

	int st;
	if (waitpid(child, &st, 0) < 0)
		die("waitpid forked");
	return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
	size_t mb = 64;
	int holes = 0, threads = 0, children = 0, post_ops = 0;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(a, "--mb") && v) mb = strtoul(v, NULL, 10), i++;
		else if (!strcmp(a, "--threads") && v) threads = atoi(v), i++;
		else if (!strcmp(a, "--children") && v) children = atoi(v), i++;
		else if (!strcmp(a, "--trigger") && v) trigger_path = v, i++;
		else if (!strcmp(a, "--result") && v) result_path = v, i++;
		else if (!strcmp(a, "--holes")) holes = 1;
		else if (!strcmp(a, "--post-ops")) post_ops = 1;
		else if (!strcmp(a, "--trigger-signal")) ; /* SIGUSR1 is always accepted */
		else {
			fprintf(stderr, "lr-workload: unknown or incomplete argument '%s'\n"
				"usage: lr-workload --mb N [--holes] [--threads T] [--children C] [--post-ops] --trigger FILE --result FILE\n", a);
			return 2;
		}
	}
	if (!trigger_path || !result_path || mb == 0) {
		fprintf(stderr, "lr-workload: --mb N (N > 0), --trigger FILE and --result FILE are required\n");
		return 2;
	}
	struct sigaction sa = { .sa_handler = on_usr1 };
	sigaction(SIGUSR1, &sa, NULL);
	struct sigaction sa2 = { .sa_handler = on_usr2 };
	sigaction(SIGUSR2, &sa2, NULL);

	/* Children first, so each fills its own memory with its own index in the pattern. */
	int ready_pipe[2];
	if (pipe(ready_pipe))
		die("pipe");
	pid_t kids[64];
	if (children > 64)
		children = 64;
	for (int c = 0; c < children; c++) {
		pid_t p = fork();
		if (p < 0)
			die("fork");
		if (p == 0) {
			proc_index = c + 1;
			role = "child";
			children = 0;
			break;
		}
		kids[c] = p;
	}

	size_t main_pages = mb * 256 / (proc_index ? 2 : 1); /* children hold half as much */
	add_region(main_pages, holes);
	add_region(16, 0); /* a small second mapping: ranges in several VMAs */
	pthread_t tid;
	for (int t = 0; t < threads; t++) {
		add_region(256, 0); /* each thread's own 1 MiB, checked by the process */
		if (pthread_create(&tid, NULL, idle_thread, NULL))
			die("pthread_create");
	}

	/* Tell the harness exactly which memory is ours (tests compare it with the dump). */
	for (int k = 0; k < nregions; k++)
		printf("region %d %d %#lx %zu\n", getpid(), k, (unsigned long)regions[k].addr, regions[k].pages);
	fflush(stdout);

	if (proc_index) {
		close(ready_pipe[0]);
		if (write(ready_pipe[1], "r", 1) != 1)
			die("write ready");
		close(ready_pipe[1]);
	} else {
		close(ready_pipe[1]);
		char b;
		for (int c = 0; c < children; c++)
			if (read(ready_pipe[0], &b, 1) != 1)
				die("read ready");
		close(ready_pipe[0]);
		printf("ready %d %d\n", getpid(), children + 1);
		fflush(stdout);
	}

	wait_trigger();
	double t0 = now_ms();
	int fail = 0;
	if (post_ops && proc_index == 0)
		fail |= post_restore_ops();
	uint64_t pages, zero_bad;
	uint64_t bad = verify_all(&pages, &zero_bad);
	report(pages, bad, zero_bad, now_ms() - t0);
	fail |= bad != 0;
	for (int c = 0; c < children; c++) {
		int st;
		if (waitpid(kids[c], &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
			fail = 1;
	}
	return fail;
}
