/*
 * lr-reaper: runs a command as its child and reaps every descendant that gets orphaned,
 * then exits with the command's own exit status (128+signal if it was killed). The command
 * runs in a session of its own.
 *
 * Why: criu dump kills the whole dumped tree. Children of the dumped root are then orphans,
 * and PID 1 on our machines does not reap them, so their pids stay taken and a restore of
 * the same tree fails ("Can't fork for PID: File exists"). A subreaper above the tree fixes
 * that without touching the tree itself (criu dumps from the command's pid down).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: lr-reaper COMMAND [ARG...]\n");
		return 2;
	}
	if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) {
		fprintf(stderr, "lr-reaper: PR_SET_CHILD_SUBREAPER: %s\n", strerror(errno));
		return 2;
	}
	pid_t root = fork();
	if (root < 0) {
		fprintf(stderr, "lr-reaper: fork: %s\n", strerror(errno));
		return 2;
	}
	if (root == 0) {
		/* criu dumps a tree whose root leads its own session (else it wants --shell-job) */
		if (setsid() < 0) {
			fprintf(stderr, "lr-reaper: setsid: %s\n", strerror(errno));
			_exit(127);
		}
		execvp(argv[1], argv + 1);
		fprintf(stderr, "lr-reaper: exec %s: %s\n", argv[1], strerror(errno));
		_exit(127);
	}
	int status = 0, root_status = -1;
	for (;;) {
		pid_t p = waitpid(-1, &status, 0);
		if (p < 0) {
			if (errno == EINTR)
				continue;
			break; /* ECHILD: nothing left to reap */
		}
		if (p == root)
			root_status = status;
	}
	if (root_status < 0)
		return 2;
	if (WIFEXITED(root_status))
		return WEXITSTATUS(root_status);
	return 128 + WTERMSIG(root_status);
}
