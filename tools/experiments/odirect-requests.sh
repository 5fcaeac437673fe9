#!/bin/bash
# How many requests a 1 MiB O_DIRECT read becomes, and what it costs: 1 GiB of FILE
# read in 1 MiB O_DIRECT reads, 4 in flight (libaio), from buffers of small pages and
# from buffers in huge pages (MADV_HUGEPAGE on 2 MiB-aligned memory), and by fio,
# alternated ROUNDS times (default 3), caches dropped before each. Prints MB/s and
# the block requests issued (perf stat). Run as root; needs gcc, perf and fio. FILE:
# at least 1 GiB of written data (e.g. a merged disk's parent image).
set -eu
FILE=$1
ROUNDS=${ROUNDS:-3}
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
cat >"$bin/aio.c" <<'C'
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
enum { N = 1024, DEPTH = 4, MIB = 1 << 20 };
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
  int huge = argc > 2 && !strcmp(argv[2], "huge");
  int fd = open(argv[1], O_RDONLY | O_DIRECT);
  if (fd < 0) { perror("open"); return 1; }
  char *buf[DEPTH];
  if (huge) {
    char *m = mmap(0, (DEPTH + 2) * (long)MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *a = (char *)(((long)m + 2 * MIB - 1) & ~(2L * MIB - 1));
    if (madvise(a, DEPTH * (long)MIB, MADV_HUGEPAGE)) perror("madvise");
    for (int i = 0; i < DEPTH; i++) buf[i] = a + (long)i * MIB;
  } else {
    for (int i = 0; i < DEPTH; i++) if (posix_memalign((void **)&buf[i], 4096, MIB)) return 1;
  }
  for (int i = 0; i < DEPTH; i++) memset(buf[i], 0, MIB);
  aio_context_t ctx = 0;
  if (syscall(SYS_io_setup, DEPTH, &ctx)) { perror("io_setup"); return 1; }
  struct iocb cb[DEPTH], *p;
  long next = 0, done = 0;
  double s = now();
  for (int i = 0; i < DEPTH; i++, next++) {
    memset(&cb[i], 0, sizeof cb[i]);
    cb[i].aio_fildes = fd; cb[i].aio_lio_opcode = IOCB_CMD_PREAD; cb[i].aio_buf = (long)buf[i];
    cb[i].aio_nbytes = MIB; cb[i].aio_offset = next * MIB; cb[i].aio_data = i;
    p = &cb[i]; syscall(SYS_io_submit, ctx, 1, &p);
  }
  while (done < N) {
    struct io_event ev[DEPTH];
    int n = syscall(SYS_io_getevents, ctx, 1, DEPTH, ev, NULL);
    for (int j = 0; j < n; j++) {
      done++;
      if ((long)ev[j].res != MIB) { fprintf(stderr, "read: %lld\n", (long long)ev[j].res); return 1; }
      if (next < N) { int i = ev[j].data; cb[i].aio_offset = next++ * MIB; p = &cb[i]; syscall(SYS_io_submit, ctx, 1, &p); }
    }
  }
  printf("%.0f MB/s", N * (double)MIB / (now() - s) / 1e6);
  return 0;
}
C
gcc -O2 -o "$bin/aio" "$bin/aio.c"
requests() { perf stat -a -x, -e block:block_rq_issue -- "$@" 2>"$bin/stat" >"$bin/out"; echo "$(cat "$bin/out"), $(cut -d, -f1 "$bin/stat" | tail -1) requests"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
for r in $(seq "$ROUNDS"); do
  drop; small=$(requests "$bin/aio" "$FILE" small)
  drop; hugep=$(requests "$bin/aio" "$FILE" huge)
  drop; f=$(requests sh -c "fio --name=r --filename='$FILE' --rw=read --bs=1M --size=1G --direct=1 --ioengine=libaio --iodepth=4 --readonly --output-format=terse --terse-version=3 | awk -F';' '{printf \"%d MB/s\", \$7/1000}'")
  echo "round $r: small pages $small; huge pages $hugep; fio $f"
done
