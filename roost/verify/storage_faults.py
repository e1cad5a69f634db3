"""Real storage faults for ``roost verify --embedded``: an LD_PRELOAD shim.

The server runs with a small C library preloaded that wraps the libc calls
SQLite makes (``fsync``/``fdatasync``, ``write``/``pwrite``,
``read``/``pread``). While the checker arms it, those calls fail on files
inside the server's data directory, as a dying or full disk makes them fail:

* ``fail-commit``: ``fsync``/``fdatasync`` return ``EIO``. SQLite in WAL mode
  with ``synchronous=FULL`` writes a transaction's pages at COMMIT and syncs
  the WAL there, so the COMMIT itself fails: the frames may be in the WAL
  file, but the transaction is not committed (and is not durable).
* ``disk-full``: ``write``/``pwrite`` return ``ENOSPC`` (SQLite: ``SQLITE_FULL``).
* ``fail-reads``: ``read``/``pread`` return ``EIO``, for the writer's reads
  inside a batch as for the reader threads.

Nothing in Roost knows about it: the shim sits below SQLite, the way a
failing disk would. The control is a small shared file the shim maps: per
kind, a counter (0: pass through; n > 0: fail the next n calls; -1: fail
every call until reset) and how many calls it failed. It needs a C compiler
when the run starts (``cc``); without one these nemeses are not offered.
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
import subprocess
from pathlib import Path

KINDS = ("fail-commit", "disk-full", "fail-reads")
_SLOT = {"fail-commit": 0, "disk-full": 1, "fail-reads": 2}
_CONTROL_SIZE = 4096

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* control[0..2]: armed counters for sync, write, read; control[3..5]: calls failed. */
static int *control;
static char dir[4096];
static size_t dir_len;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void setup(void) {
    const char *path = getenv("ROOST_STORAGE_FAULTS");
    const char *d = getenv("ROOST_STORAGE_FAULTS_DIR");
    if (!path || !d || strlen(d) >= sizeof dir) return;
    int fd = open(path, O_RDWR);
    if (fd < 0) return;
    void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return;
    strcpy(dir, d);
    dir_len = strlen(dir);
    control = m;
}

/* Should this call on fd fail? Only files under the data directory do. */
static int should_fail(int fd, int slot) {
    pthread_once(&once, setup);
    if (!control) return 0;
    int n = __atomic_load_n(&control[slot], __ATOMIC_SEQ_CST);
    if (n == 0) return 0;
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, target, sizeof target - 1);
    if (len <= (ssize_t)dir_len || strncmp(target, dir, dir_len) != 0 || target[dir_len] != '/') return 0;
    while (n != 0) {
        if (n < 0 || __atomic_compare_exchange_n(&control[slot], &n, n - 1, 0, __ATOMIC_SEQ_CST,
                                                 __ATOMIC_SEQ_CST)) {
            __atomic_add_fetch(&control[3 + slot], 1, __ATOMIC_SEQ_CST);
            return 1;
        }
    }
    return 0;
}

#define WRAP(ret, name, slot, err, params, args)                               \
    ret name params {                                                          \
        static ret (*real) params;                                             \
        if (should_fail(fd, slot)) { errno = err; return -1; }                 \
        if (!real) real = (ret (*) params)dlsym(RTLD_NEXT, #name);             \
        return real args;                                                      \
    }

WRAP(int, fsync, 0, EIO, (int fd), (fd))
WRAP(int, fdatasync, 0, EIO, (int fd), (fd))
WRAP(ssize_t, write, 1, ENOSPC, (int fd, const void *b, size_t n), (fd, b, n))
WRAP(ssize_t, pwrite, 1, ENOSPC, (int fd, const void *b, size_t n, off_t o), (fd, b, n, o))
WRAP(ssize_t, pwrite64, 1, ENOSPC, (int fd, const void *b, size_t n, off64_t o), (fd, b, n, o))
WRAP(ssize_t, read, 2, EIO, (int fd, void *b, size_t n), (fd, b, n))
WRAP(ssize_t, pread, 2, EIO, (int fd, void *b, size_t n, off_t o), (fd, b, n, o))
WRAP(ssize_t, pread64, 2, EIO, (int fd, void *b, size_t n, off64_t o), (fd, b, n, o))
"""


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


class StorageFaults:
    """The shim built into ``root`` and its control file, for one server's data directory."""

    def __init__(self, root: Path, data_dir: Path) -> None:
        self.library = root / "storage-faults.so"
        self.control_path = root / "storage-faults.ctl"
        self.data_dir = data_dir
        self._map: mmap.mmap | None = None
        self._failed = dict.fromkeys(KINDS, 0)

    def build(self) -> None:
        cc = compiler()
        if cc is None:
            raise RuntimeError("no C compiler (cc) to build the storage-fault shim")
        source = self.library.with_suffix(".c")
        source.write_text(SHIM_SOURCE)
        subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-o", str(self.library), str(source), "-ldl", "-lpthread"],
            check=True, capture_output=True,
        )  # fmt: skip
        self.control_path.write_bytes(bytes(_CONTROL_SIZE))
        with open(self.control_path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), _CONTROL_SIZE)

    def env(self) -> dict[str, str]:
        """What the server process needs in its environment to carry the shim."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return {
            "LD_PRELOAD": str(self.library),
            "ROOST_STORAGE_FAULTS": str(self.control_path),
            "ROOST_STORAGE_FAULTS_DIR": os.path.realpath(self.data_dir),
        }

    def arm(self, kind: str, count: int = -1) -> None:
        """Fail the next ``count`` calls of this kind (-1: all, until :meth:`clear`)."""
        assert self._map is not None
        struct.pack_into("i", self._map, 4 * _SLOT[kind], count)

    def clear(self) -> None:
        assert self._map is not None
        struct.pack_into("3i", self._map, 0, 0, 0, 0)

    def failed_calls(self) -> dict[str, int]:
        """How many calls the shim failed so far, by kind (the last count once closed)."""
        if self._map is not None:
            self._failed = dict(zip(KINDS, struct.unpack_from("3i", self._map, 12), strict=True))
        return dict(self._failed)

    def close(self) -> None:
        if self._map is not None:
            self.failed_calls()
            self._map.close()
            self._map = None
