// Time loops whose steps are split into blocks over threads (ATen).
//
// parallel_steps runs, for every step s in [0, steps) and over the blocks [0, blocks) of each
// step split over threads in contiguous shares, prepare(s, begin, end) and then
// step(s, begin, end); every block's step(s - 1) is done before any step(s) starts, while
// prepare(s), which must not read what steps write, may run as soon as its thread is done with
// step(s - 1): its work fills the time a thread would otherwise wait for slower ones.
//
// persistent: one OpenMP parallel region for the whole loop, the threads meeting at a split-phase
// barrier per step (an atomic count of arrivals) instead of one at::parallel_for per step (a fork
// and a join); prepare and step must not throw there. One block, or one thread: the steps run on
// the calling thread (where nested at::parallel_for calls may still split work). Otherwise each
// step is one at::parallel_for.
//
// Worker threads do not start in their caller's thread-local modes: every share of work here (and
// in fastrnn_cpu::parallel_for) runs in the caller's inference mode, so that ATen ops on a
// worker may write into the caller's inference tensors, and with grad mode off (the kernels never
// differentiate).

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastrnn_cpu {

// Spins until count reaches target; yields the core now and then, should threads outnumber cores.
inline void wait_for_count(const std::atomic<int64_t>& count, int64_t target) {
  for (int64_t spins = 1; count.load(std::memory_order_acquire) < target; ++spins) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if (spins % 4096 == 0) std::this_thread::yield();
  }
}

// What a worker thread takes of its caller's modes.
struct CallerModes {
  bool inference = c10::InferenceMode::is_enabled();
};

// On a worker thread, for one share of work: the caller's inference mode, grad mode off.
class InCallerModes {
 public:
  explicit InCallerModes(const CallerModes& caller) : inference_(caller.inference) {}

 private:
  c10::InferenceMode inference_;
  at::NoGradGuard no_grad_;
};

// at::parallel_for, each share of work in the caller's modes.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const CallerModes caller;
  at::parallel_for(begin, end, grain, [&](int64_t first, int64_t last) {
    const InCallerModes modes(caller);
    f(first, last);
  });
}

template <typename Prepare, typename Step>
void parallel_steps(int64_t steps, int64_t blocks, bool persistent, const Prepare& prepare,
                    const Step& step) {
#ifdef _OPENMP
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks);
  if (persistent && threads > 1 && !at::in_parallel_region()) {
    std::atomic<int64_t> arrivals{0};  // one per thread and step done
    const CallerModes caller;
#pragma omp parallel num_threads(threads)
    {
      const InCallerModes modes(caller);
      const int64_t team = omp_get_num_threads(), rank = omp_get_thread_num();
      const int64_t share = (blocks + team - 1) / team;
      const int64_t begin = std::min(blocks, rank * share), end = std::min(blocks, begin + share);
      for (int64_t s = 0; s < steps; ++s) {
        prepare(s, begin, end);
        wait_for_count(arrivals, s * team);  // every thread done with step s - 1
        step(s, begin, end);
        arrivals.fetch_add(1, std::memory_order_acq_rel);
      }
    }  // the region's end waits for every thread
    return;
  }
#endif
  if (blocks == 1 || at::get_num_threads() == 1) {  // on this thread, free to go parallel inside
    const at::NoGradGuard no_grad;
    for (int64_t s = 0; s < steps; ++s) {
      prepare(s, 0, blocks);
      step(s, 0, blocks);
    }
    return;
  }
  for (int64_t s = 0; s < steps; ++s) {
    parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      prepare(s, begin, end);
      step(s, begin, end);
    });
  }
}

}  // namespace fastrnn_cpu
