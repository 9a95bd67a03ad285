/*
 * The CRI tests' sandbox ("pause") program: hold the pod's namespaces until told to stop.
 *
 * Waits synchronously for signals (nothing runs in a handler): SIGTERM or SIGINT ends it with
 * status 0; SIGCHLD reaps every exited child, which matters when it is pid 1 of a pod-shared pid
 * namespace and orphans are reparented to it.  Built with `gcc -static` by tests/cri/images.py.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>

int main(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0)
        return 1;
    for (;;) {
        int sig = sigwaitinfo(&set, NULL);
        if (sig == SIGTERM || sig == SIGINT)
            return 0;
        if (sig == SIGCHLD)
            while (waitpid(-1, NULL, WNOHANG) > 0)
                ;
    }
}
