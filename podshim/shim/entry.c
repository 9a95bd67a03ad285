/* containerd-shim-podshim-v1: the binary containerd execs for every `start` and `delete`.
 *
 * It hands the action to this containerd's warm podshim zygote (podshim/shim/zygote.py: the
 * protocol is described there) and exits with the action's exit code. When anything is off (no
 * zygote, a refusal, no answer within ANSWER_MS, a request too big) it execs the Python entry
 * point, <this dir>/podshim-cold/<this name>, which runs the action cold, exactly as it would
 * without this program (and shows the same name in ps).
 * No logic beyond that: scripts/setup.sh builds it with gcc when a compiler is there. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef ANSWER_MS
#define ANSWER_MS 30 /* for the zygote's "A": it is alive; after that we run cold */
#endif
#define READY_MS 2000 /* for its worker's "R" (ready) or "N" (refused) */
#define MAGIC 0x315A5350u /* "PSZ1" */
#define MAX_REQUEST (64 * 1024)

extern char **environ;
static char self[PATH_MAX];

static void cold(char **argv) {
    char path[PATH_MAX + 16];
    char *slash = strrchr(self, '/');
    snprintf(path, sizeof path, "%.*s/podshim-cold%s", (int)(slash - self), self, slash);
    execv(path, argv);
    fprintf(stderr, "containerd-shim-podshim-v1: exec %s: %s\n", path, strerror(errno));
    exit(1);
}

/* <containerd state>/s/zygote-<inode>-<mtime> of this binary; the cwd is the bundle,
 * <state>/io.containerd.runtime.v2.task/<namespace>/<id>. */
static int zygote_path(struct sockaddr_un *sa) {
    char cwd[PATH_MAX];
    struct stat st;
    if (!getcwd(cwd, sizeof cwd) || stat(self, &st) < 0)
        return -1;
    for (int i = 0; i < 3; i++) {
        char *slash = strrchr(cwd, '/');
        if (slash == NULL || slash == cwd)
            return -1;
        *slash = '\0';
    }
    unsigned long long mtime = (unsigned long long)st.st_mtim.tv_sec * 1000000000ull + st.st_mtim.tv_nsec;
    int n = snprintf(sa->sun_path, sizeof sa->sun_path, "%s/s/zygote-%llx-%llx", cwd,
                     (unsigned long long)st.st_ino, mtime);
    return n > 0 && (size_t)n < sizeof sa->sun_path ? 0 : -1;
}

static int answered(int s, int ms, char want) {
    char c = 0;
    struct pollfd p = {.fd = s, .events = POLLIN};
    return poll(&p, 1, ms) == 1 && recv(s, &c, 1, 0) == 1 && c == want;
}

static int add(char *buf, size_t *len, const char *s) {
    size_t n = strlen(s) + 1;
    if (*len + n > MAX_REQUEST)
        return -1;
    memcpy(buf + *len, s, n);
    *len += n;
    return 0;
}

int main(int argc, char **argv) {
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0 || self[0] != '/') {
        fprintf(stderr, "containerd-shim-podshim-v1: /proc/self/exe: %s\n", strerror(errno));
        return 1;
    }
    self[n] = '\0';

    /* The zygote's "A" (alive) before anything is sent: fds in flight to a zygote that never
     * reads them would hold containerd's pipe open after a cold fallback. */
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (zygote_path(&sa) < 0 || s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        !answered(s, ANSWER_MS, 'A'))
        cold(argv);

    static char buf[MAX_REQUEST];
    uint32_t envc = 0;
    while (environ[envc])
        envc++;
    mode_t mask = umask(0);
    umask(mask);
    uint32_t header[4] = {MAGIC, mask, (uint32_t)argc, envc};
    size_t len = sizeof header;
    memcpy(buf, header, sizeof header);
    for (int i = 0; i < argc; i++)
        if (add(buf, &len, argv[i]) < 0)
            cold(argv);
    for (uint32_t i = 0; i < envc; i++)
        if (add(buf, &len, environ[i]) < 0)
            cold(argv);

    int fds[4] = {0, 1, 2, open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
    for (int i = 0; i < 4; i++)
        if (fds[i] < 0 || fcntl(fds[i], F_GETFD) < 0)
            cold(argv);
    union {
        struct cmsghdr align;
        char space[CMSG_SPACE(sizeof fds)];
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                         .msg_controllen = sizeof control.space};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cm), fds, sizeof fds);
    if (sendmsg(s, &msg, MSG_NOSIGNAL) != (ssize_t)len)
        cold(argv);
    close(fds[3]);

    /* Its worker is ready (not refused): "go". The worker runs nothing before "go", so falling
     * back cold up to here never runs the action twice. */
    if (!answered(s, READY_MS, 'R') || send(s, "G", 1, MSG_NOSIGNAL) != 1)
        cold(argv);

    unsigned char code;
    ssize_t r;
    while ((r = recv(s, &code, 1, 0)) < 0 && errno == EINTR)
        ;
    if (r != 1) {
        fprintf(stderr, "containerd-shim-podshim-v1: the zygote's worker died during the action\n");
        return 1;
    }
    return code;
}
