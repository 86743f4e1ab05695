/*
 * The sandbox ("pause") process of ModelFleet's test node.
 *
 * Every pod's sandbox container runs this as PID 1: it only holds the pod's
 * namespaces open, reaps children re-parented to it (pods that share a PID
 * namespace), and exits when the runtime stops the sandbox (SIGINT/SIGTERM).
 * Built static by scripts/node-install.sh and wrapped as an OCI image there,
 * because no image registry is reachable from the machines that run the tests.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PAUSE_VERSION
#define PAUSE_VERSION "dev"
#endif

static void on_stop(int sig) {
    (void)sig;
    _exit(0);
}

static void on_child(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        printf("modelfleet-pause %s\n", PAUSE_VERSION);
        return 0;
    }
    if (getpid() != 1) {
        fprintf(stderr, "modelfleet-pause: warning: not running as PID 1\n");
    }
    struct sigaction stop, child;
    memset(&stop, 0, sizeof stop);
    memset(&child, 0, sizeof child);
    stop.sa_handler = on_stop;
    child.sa_handler = on_child;
    child.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGINT, &stop, NULL) < 0 || sigaction(SIGTERM, &stop, NULL) < 0 ||
        sigaction(SIGCHLD, &child, NULL) < 0) {
        perror("modelfleet-pause: sigaction");
        return 1;
    }
    for (;;) {
        pause();
    }
}
