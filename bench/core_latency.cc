// The round trip of one cache line between two CPUs: two threads, pinned to CPUs A and B, take turns
// writing a shared counter (A writes odd values, B answers with the next even one), N times. Prints
// the mean nanoseconds per round trip. On a VM this shows where the host has placed the two vCPUs:
// docs/BENCHMARKS.md ("Rows per core") found 65 ns and 330 ns on the same Zen 4 VM at different times,
// and the kernel's two-thread time following it.
//
//     core_latency A B [N]     (bench/_common.py compiles and runs it: core_round_trip_ns)
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace {

alignas(64) std::atomic<long> turn{0};
alignas(64) std::atomic<int> ready{0};  // the answering thread: 1 pinned, -1 could not pin

bool pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: core_latency CPU_A CPU_B [ROUND_TRIPS]\n");
    return 2;
  }
  const int a = std::atoi(argv[1]), b = std::atoi(argv[2]);
  const long n = argc > 3 ? std::atol(argv[3]) : 200000;
  if (a == b || a < 0 || b < 0 || n <= 0) {
    std::fprintf(stderr, "core_latency: needs two different CPUs and a positive count, got %s %s %ld\n",
                 argv[1], argv[2], n);
    return 2;
  }
  if (!pin(a)) {
    std::fprintf(stderr, "core_latency: cannot run on CPU %d\n", a);
    return 2;
  }
  std::thread answer([&] {
    const bool ok = pin(b);
    ready.store(ok ? 1 : -1, std::memory_order_release);
    if (!ok) return;
    for (long i = 0; i < n; ++i) {
      while (turn.load(std::memory_order_acquire) != 2 * i + 1) {
      }
      turn.store(2 * i + 2, std::memory_order_release);
    }
  });
  while (ready.load(std::memory_order_acquire) == 0) {
  }
  if (ready.load() < 0) {  // both threads on one CPU would measure the scheduler, not the caches
    answer.join();
    std::fprintf(stderr, "core_latency: cannot run on CPU %d\n", b);
    return 2;
  }
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
    turn.store(2 * i + 1, std::memory_order_release);
    while (turn.load(std::memory_order_acquire) != 2 * i + 2) {
    }
  }
  const auto stop = std::chrono::steady_clock::now();
  answer.join();
  std::printf("%.1f\n", std::chrono::duration<double, std::nano>(stop - start).count() / n);
  return 0;
}
