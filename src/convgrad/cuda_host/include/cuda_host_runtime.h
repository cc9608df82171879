// cuda_host_runtime.h: the emulated execution model (fibers, barriers, warp collectives, grid).
//
// See cuda_host.h for the model as kernel authors see it.  This file is the machinery:
//
//   Fiber        one CUDA thread: a stack of its own and a saved context.
//   Executor     one per OS thread; runs whole blocks, one at a time, by switching between
//                the block's fibers from a scheduler loop on the OS thread's own stack.
//   WarpState    per warp: the lanes' deposits for the collective they are waiting in.
//   WorkerPool   persistent OS threads that take blocks from a shared counter.
//
// A fiber runs until it blocks (in __syncthreads, a warp collective, or by returning); it
// then switches back to the scheduler, which resumes the next fiber of its FIFO run queue.
// That queue starts in thread order and is refilled in thread order when a barrier or a warp
// collective completes, so a schedule depends only on the kernel and the launch, never on
// timing: every run of the same launch interleaves the threads identically.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "cuda_host_types.h"

// ---------------------------------------------------------------------------------------
// Build configuration.

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_HOST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_HOST_ASAN 1
#endif
#endif
#ifndef CUDA_HOST_ASAN
#define CUDA_HOST_ASAN 0
#endif

#if CUDA_HOST_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// The hand-written switch saves only what the ABI makes callee-saved and makes no system
// call; elsewhere (or with -DCUDA_HOST_USE_UCONTEXT) swapcontext does the same, slower, job.
#if defined(__x86_64__) && !defined(CUDA_HOST_USE_UCONTEXT)
#define CUDA_HOST_CUSTOM_SWITCH 1
#else
#define CUDA_HOST_CUSTOM_SWITCH 0
#include <ucontext.h>
#endif

// Upper bound of a launch's dynamic shared memory (the GPU's is 227 KiB).  The buffer itself
// is defined by the build (an alias for every `extern __shared__` array, see build.py).
#ifndef CUDA_HOST_MAX_DYNAMIC_SHARED_BYTES
#define CUDA_HOST_MAX_DYNAMIC_SHARED_BYTES (256 * 1024)
#endif
extern thread_local unsigned char cuda_host_dynamic_shared_memory[];

#define CUDA_HOST_EXPORT extern "C" __attribute__((visibility("default")))

// ---------------------------------------------------------------------------------------
// Context switching.

#if CUDA_HOST_CUSTOM_SWITCH
extern "C" void cuda_host_switch_context(void** save_sp, void* load_sp);
extern "C" void cuda_host_fiber_trampoline();

// Saves rbp, rbx, r12-r15, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save_sp, and resumes the context whose stack pointer is load_sp.  A new
// context "returns" into the trampoline, which calls r13(r12); its CFI marks the outermost
// frame, so debuggers stop unwinding there.  The COMDAT group lets two translation units of
// one library each carry the code.
asm(R"(
  .pushsection .text.cuda_host_switch_context,"axG",%progbits,cuda_host_switch_context,comdat
  .globl cuda_host_switch_context
  .hidden cuda_host_switch_context
  .type cuda_host_switch_context, %function
  .p2align 4
cuda_host_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_host_switch_context, .-cuda_host_switch_context

  .globl cuda_host_fiber_trampoline
  .hidden cuda_host_fiber_trampoline
  .type cuda_host_fiber_trampoline, %function
  .p2align 4
cuda_host_fiber_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size cuda_host_fiber_trampoline, .-cuda_host_fiber_trampoline
  .popsection
)");
#endif

namespace cuda_host {
namespace detail {

#if CUDA_HOST_CUSTOM_SWITCH
struct Context {
  void* sp = nullptr;
};

// Lays out a fresh stack as cuda_host_switch_context leaves a suspended one: control words,
// six callee-saved registers (r13 = entry, r12 = arg, rbp = 0 ends frame-pointer unwinding),
// then the trampoline as return address, so that after `ret` the stack is 16-byte aligned.
inline void context_prepare(Context& c, unsigned char* stack_lo, size_t size,
                            void (*entry)(void*), void* arg) {
  const uintptr_t top = (uintptr_t(stack_lo) + size) & ~uintptr_t(15);
  void** frame = reinterpret_cast<void**>(top - 8 * sizeof(void*));
  uint32_t mxcsr;
  uint16_t fpu_control;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  const uint64_t control = uint64_t(mxcsr) | (uint64_t(fpu_control) << 32);
  std::memcpy(&frame[0], &control, sizeof control);
  frame[1] = nullptr;                                               // r15
  frame[2] = nullptr;                                               // r14
  frame[3] = reinterpret_cast<void*>(entry);                        // r13
  frame[4] = arg;                                                   // r12
  frame[5] = nullptr;                                               // rbx
  frame[6] = nullptr;                                               // rbp
  frame[7] = reinterpret_cast<void*>(&cuda_host_fiber_trampoline);  // return address
  c.sp = frame;
}

inline void context_switch(Context& from, Context& to) {
  cuda_host_switch_context(&from.sp, to.sp);
}
#else
struct Context {
  ucontext_t uc;
};

// makecontext passes int arguments only: the entry and its argument travel as 32-bit halves.
inline void ucontext_trampoline(unsigned e_hi, unsigned e_lo, unsigned a_hi, unsigned a_lo) {
  auto entry = reinterpret_cast<void (*)(void*)>((uintptr_t(e_hi) << 32) | uintptr_t(e_lo));
  void* arg = reinterpret_cast<void*>((uintptr_t(a_hi) << 32) | uintptr_t(a_lo));
  entry(arg);
  std::abort();  // a fiber never returns: it switches away for the last time instead
}

inline void context_prepare(Context& c, unsigned char* stack_lo, size_t size,
                            void (*entry)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack_lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  const uintptr_t e = reinterpret_cast<uintptr_t>(entry);
  const uintptr_t a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(&ucontext_trampoline), 4,
              unsigned(e >> 32), unsigned(e), unsigned(a >> 32), unsigned(a));
}

inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// Switches stacks and tells AddressSanitizer, which otherwise takes the other stack's frames
// for wild accesses.  `from_fake` saves the leaving side's fake stack (nullptr: it never
// resumes).  The code after the switch runs when `from` is resumed, on its own stack again.
inline void switch_fiber(Context& from, void** from_fake, Context& to, const void* to_bottom,
                         size_t to_size) {
#if CUDA_HOST_ASAN
  __sanitizer_start_switch_fiber(from_fake, to_bottom, to_size);
#else
  (void)to_bottom;
  (void)to_size;
#endif
  context_switch(from, to);
#if CUDA_HOST_ASAN
  __sanitizer_finish_switch_fiber(from_fake ? *from_fake : nullptr, nullptr, nullptr);
#else
  (void)from_fake;
#endif
}

// ---------------------------------------------------------------------------------------
// Fibers and their stacks.

// A stack mapped with a PROT_NONE guard page below it, so an overflow faults at once instead
// of running into a neighbour's stack.  Pages are committed only when touched.
class FiberStack {
 public:
  FiberStack() = default;
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;
  ~FiberStack() { release(); }

  bool allocate(size_t size) {
    release();
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    size = (size + page - 1) / page * page;
    void* map = mmap(nullptr, size + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) return false;
    mprotect(map, page, PROT_NONE);
    map_ = map;
    map_size_ = size + page;
    lo_ = static_cast<unsigned char*>(map) + page;
    size_ = size;
    return true;
  }

  unsigned char* lo() const { return lo_; }
  size_t size() const { return size_; }

 private:
  void release() {
#if CUDA_HOST_ASAN
    // The redzones of the frames last on this stack stay poisoned in ASan's shadow, which
    // outlives munmap: clear them, or the next mapping at this address reports false errors.
    if (lo_ != nullptr) ASAN_UNPOISON_MEMORY_REGION(lo_, size_);
#endif
    if (map_ != nullptr) munmap(map_, map_size_);
    map_ = nullptr;
    lo_ = nullptr;
    size_ = 0;
  }
  void* map_ = nullptr;
  size_t map_size_ = 0;
  unsigned char* lo_ = nullptr;
  size_t size_ = 0;
};

enum class FiberState : uint8_t { runnable, at_barrier, at_warp_op, exited };

class Executor;

// One cp.async a thread has issued that has not landed yet (cuda_host_ptx.h).  The source
// bytes are read at issue; they reach `dst` only at the wait that covers `group`.
struct PendingCopy {
  unsigned char* dst;
  uint64_t group;  // the thread's commit-group count when the copy was issued
  unsigned bytes;
  alignas(16) unsigned char data[16];
};

struct Fiber {
  Context ctx;
  FiberStack stack;
  void* fake_stack = nullptr;  // AddressSanitizer's fake stack, while suspended
  uint3 thread_idx{};
  unsigned linear = 0;
  FiberState state = FiberState::runnable;
  Executor* exec = nullptr;
  // This thread's asynchronous copies, in issue order, and how many groups it has committed.
  std::vector<PendingCopy> pending_copies;
  uint64_t committed_copy_groups = 0;
};

// ---------------------------------------------------------------------------------------
// Warp collectives.
//
// Every warp intrinsic is one rendezvous: the lane deposits its input in its slot and waits;
// the lane whose arrival completes the group (every lane of the mask that exists in the
// block) runs the intrinsic's `compute` once for the whole group, which writes each lane's
// result into that lane's slot, and wakes the group.  Each lane then reads its own result.
// A lane's slot is written again only when that lane deposits anew, so a lane that runs
// ahead can never clobber a result another lane has not read yet.

constexpr unsigned kWarpSize = 32;
constexpr unsigned kSlotBytes = 64;

struct WarpState;
using CollectiveFn = void (*)(WarpState& warp, unsigned group);

struct LaneSlot {
  alignas(16) unsigned char in[kSlotBytes];
  alignas(16) unsigned char out[kSlotBytes];
  CollectiveFn compute;
  const char* name;  // the intrinsic, for diagnostics
  unsigned mask;
  int arg;        // per-lane operand (the source lane of a shuffle)
  unsigned size;  // bytes deposited
};

struct WarpState {
  unsigned existing = 0;    // lanes that exist in this block (a last warp may be partial)
  unsigned arrived = 0;     // lanes waiting in a collective
  unsigned exited = 0;      // lanes whose thread has returned
  unsigned activemask = 0;  // lanes waiting in __activemask()
  LaneSlot lane[kWarpSize];
};

// ---------------------------------------------------------------------------------------
// The CUDA built-in variables of the current thread (threadIdx, ...), per OS thread.  The
// scheduler sets thread_idx before it resumes each fiber; a fiber reads it only between two
// switches, and every switch is an opaque call, so no stale copy survives one.

struct Builtins {
  uint3 thread_idx{};
  uint3 block_idx{};
  dim3 block_dim{};
  dim3 grid_dim{};
  Executor* exec = nullptr;
  Fiber* fiber = nullptr;
};
inline thread_local Builtins builtins{};

// Everything about a launch that every block needs.
struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t shared_mem = 0;
  bool reversed_threads = false;
  size_t stack_size = 0;
  void (*invoke)(const void*) = nullptr;  // calls the kernel with the launch's arguments
  const void* closure = nullptr;
};

constexpr size_t kMessageBytes = 1024;

class Executor {
 public:
  // The executor of the calling OS thread; its fibers (and their stacks) are kept between
  // blocks and launches, and freed when the OS thread ends.
  static Executor& for_this_thread() {
    static thread_local std::unique_ptr<Executor> exec;
    if (!exec) exec.reset(new Executor);
    return *exec;
  }

  const char* message() const { return message_; }

  // Dynamic shared memory of the running launch, in bytes.
  size_t shared_mem_bytes() const { return shape_->shared_mem; }

  // Runs block `block_linear` (x fastest) to completion.  Returns false, with message(), if
  // the kernel failed (a deadlock, a misused intrinsic, __trap).
  bool run_block(const LaunchShape& shape, uint64_t block_linear) {
    shape_ = &shape;
    failed_ = false;
    message_[0] = '\0';
    const unsigned nthreads = shape.block.x * shape.block.y * shape.block.z;
    if (!ensure_fibers(nthreads, shape.stack_size)) {
      std::snprintf(message_, kMessageBytes, "cannot map %u fiber stacks of %zu bytes", nthreads,
                    shape.stack_size);
      return false;
    }
    nthreads_ = nthreads;

    Builtins& b = builtins;
    b.block_dim = shape.block;
    b.grid_dim = shape.grid;
    const uint64_t gx = shape.grid.x, gy = shape.grid.y;
    b.block_idx = uint3{unsigned(block_linear % gx), unsigned((block_linear / gx) % gy),
                        unsigned(block_linear / (gx * gy))};
    b.exec = this;
    prepare_shared_memory(shape.shared_mem);

    const unsigned nwarps = (nthreads + kWarpSize - 1) / kWarpSize;
    for (unsigned w = 0; w < nwarps; ++w) {
      const unsigned lanes = std::min(kWarpSize, nthreads - w * kWarpSize);
      warps_[w].existing = lanes == kWarpSize ? ~0u : ((1u << lanes) - 1u);
      warps_[w].arrived = 0;
      warps_[w].exited = 0;
      warps_[w].activemask = 0;
    }
    const unsigned bx = shape.block.x, by = shape.block.y;
    for (unsigned i = 0; i < nthreads; ++i) {
      Fiber& f = fibers_[i];
#if CUDA_HOST_ASAN
      // Frames abandoned by a failed launch may have left their redzones poisoned.
      if (stacks_dirty_) ASAN_UNPOISON_MEMORY_REGION(f.stack.lo(), f.stack.size());
#endif
      f.linear = i;
      f.thread_idx = uint3{i % bx, (i / bx) % by, i / (bx * by)};
      f.state = FiberState::runnable;
      f.exec = this;
      f.fake_stack = nullptr;
      // Copies a thread left pending when its block ended never land anywhere.
      f.pending_copies.clear();
      f.committed_copy_groups = 0;
      context_prepare(f.ctx, f.stack.lo(), f.stack.size(), &fiber_main, &f);
    }
    stacks_dirty_ = false;
    live_ = nthreads;
    exited_ = 0;
    barrier_arrived_ = 0;
    barrier_true_ = 0;
    queue_head_ = 0;
    queue_count_ = 0;
    for (unsigned i = 0; i < nthreads; ++i) push(shape.reversed_threads ? nthreads - 1 - i : i);

    while (queue_count_ != 0 && !failed_) {
      const unsigned id = pop();
      Fiber& f = fibers_[id];
      b.thread_idx = f.thread_idx;
      b.fiber = &f;
      switch_fiber(sched_ctx_, &sched_fake_stack_, f.ctx, f.stack.lo(), f.stack.size());
    }
    b.fiber = nullptr;
    if (!failed_ && exited_ != nthreads) report_deadlock();
    if (failed_) stacks_dirty_ = true;
    b.exec = nullptr;
    return !failed_;
  }

  // -- called from fibers --------------------------------------------------------------

  struct BarrierResult {
    unsigned arrived;     // threads that took part
    unsigned true_count;  // of those, how many passed a true predicate
  };

  BarrierResult block_barrier(bool predicate) {
    Fiber& f = *builtins.fiber;
    f.state = FiberState::at_barrier;
    ++barrier_arrived_;
    barrier_true_ += predicate ? 1u : 0u;
    if (barrier_arrived_ == live_) release_barrier();
    try_release_activemask(f.linear / kWarpSize);
    yield(f);
    return last_barrier_;
  }

  // Deposits `size` bytes and waits for the group; returns this lane's result slot.
  const unsigned char* warp_collective(unsigned mask, CollectiveFn compute, const char* name,
                                       int arg, const void* in, unsigned size) {
    Fiber& f = *builtins.fiber;
    const unsigned lane = f.linear % kWarpSize;
    WarpState& w = warps_[f.linear / kWarpSize];
    if ((mask & (1u << lane)) == 0)
      fail("%s: the calling lane %u is not in mask 0x%08x", name, lane, mask);
    LaneSlot& slot = w.lane[lane];
    if (size != 0) std::memcpy(slot.in, in, size);
    slot.compute = compute;
    slot.name = name;
    slot.mask = mask;
    slot.arg = arg;
    slot.size = size;
    w.arrived |= 1u << lane;
    f.state = FiberState::at_warp_op;
    const unsigned group = mask & w.existing;
    if ((w.arrived & group) == group) complete_collective(w, f.linear / kWarpSize, group, slot);
    try_release_activemask(f.linear / kWarpSize);
    yield(f);
    return slot.out;
  }

  // __activemask(): the lanes that are "converged" with the caller.  The emulation's
  // equivalent of convergence: the caller waits until every lane of its warp has either
  // returned or stopped at some synchronisation point, and gets the lanes that stopped at
  // __activemask().  So `if (i >= n) return; m = __activemask();` gives the lanes below n,
  // as on the GPU, whatever order the lanes run in.
  unsigned active_mask() {
    Fiber& f = *builtins.fiber;
    const unsigned lane = f.linear % kWarpSize;
    const unsigned warp = f.linear / kWarpSize;
    WarpState& w = warps_[warp];
    w.activemask |= 1u << lane;
    f.state = FiberState::at_warp_op;
    try_release_activemask(warp);
    yield(f);
    unsigned result;
    std::memcpy(&result, w.lane[lane].out, sizeof result);
    return result;
  }

  // Ends the launch with an error that names the thread; never returns to the kernel.
  [[noreturn]] __attribute__((format(printf, 2, 3))) void fail(const char* format, ...) {
    Fiber& f = *builtins.fiber;
    const uint3 bi = builtins.block_idx;
    int n = std::snprintf(message_, kMessageBytes, "block (%u,%u,%u) thread (%u,%u,%u): ", bi.x,
                          bi.y, bi.z, f.thread_idx.x, f.thread_idx.y, f.thread_idx.z);
    if (n < 0) n = 0;
    va_list ap;
    va_start(ap, format);
    std::vsnprintf(message_ + n, kMessageBytes - size_t(n), format, ap);
    va_end(ap);
    failed_ = true;
    for (;;) yield(f);  // the scheduler sees failed_ and never resumes this fiber
  }

 private:
  Executor() = default;

  static void fiber_main(void* arg) {
    Fiber& f = *static_cast<Fiber*>(arg);
    Executor& ex = *f.exec;
#if CUDA_HOST_ASAN
    // First entry: learn the scheduler's stack, which the switches back need to name.
    __sanitizer_finish_switch_fiber(nullptr, &ex.sched_stack_bottom_, &ex.sched_stack_size_);
#endif
    ex.shape_->invoke(ex.shape_->closure);
    ex.thread_exited(f);
    // The last switch: nullptr tells AddressSanitizer this fiber's fake stack can go.
    switch_fiber(f.ctx, nullptr, ex.sched_ctx_, ex.sched_stack_bottom_, ex.sched_stack_size_);
    std::abort();  // never resumed
  }

  void yield(Fiber& f) {
    switch_fiber(f.ctx, &f.fake_stack, sched_ctx_, sched_stack_bottom_, sched_stack_size_);
  }

  bool ensure_fibers(unsigned count, size_t stack_size) {
    if (stack_size != stack_size_) {
      fibers_.reset();
      capacity_ = 0;
      stack_size_ = stack_size;
    }
    if (count <= capacity_) return true;
    // Growing maps every stack afresh: it happens once per larger block size, and a Fiber
    // (its context points into its own stack) must not move while it is in use.
    std::unique_ptr<Fiber[]> grown(new Fiber[count]);
    for (unsigned i = 0; i < count; ++i)
      if (!grown[i].stack.allocate(stack_size)) return false;
    fibers_ = std::move(grown);
    capacity_ = count;
    queue_.reset(new unsigned[count]);
    warps_.reset(new WarpState[(count + kWarpSize - 1) / kWarpSize]);
    return true;
  }

  void prepare_shared_memory(size_t bytes) {
    unsigned char* smem = cuda_host_dynamic_shared_memory;
#if CUDA_HOST_ASAN
    // Bytes past the launch's shared_mem are off limits: poisoned, so ASan reports a kernel
    // that indexes beyond what it asked for.
    ASAN_UNPOISON_MEMORY_REGION(smem, bytes);
    ASAN_POISON_MEMORY_REGION(smem + bytes, CUDA_HOST_MAX_DYNAMIC_SHARED_BYTES - bytes);
#endif
    // 0xFF bytes are a NaN in every floating-point format, so unwritten reads show up.
    std::memset(smem, 0xff, bytes);
  }

  void push(unsigned id) {
    queue_[(queue_head_ + queue_count_) % nthreads_] = id;
    ++queue_count_;
  }

  unsigned pop() {
    const unsigned id = queue_[queue_head_];
    queue_head_ = (queue_head_ + 1) % nthreads_;
    --queue_count_;
    return id;
  }

  void release_barrier() {
    last_barrier_ = BarrierResult{barrier_arrived_, barrier_true_};
    barrier_arrived_ = 0;
    barrier_true_ = 0;
    for (unsigned k = 0; k < nthreads_; ++k) {
      const unsigned id = shape_->reversed_threads ? nthreads_ - 1 - k : k;
      if (fibers_[id].state == FiberState::at_barrier) {
        fibers_[id].state = FiberState::runnable;
        push(id);
      }
    }
  }

  void complete_collective(WarpState& w, unsigned warp, unsigned group, const LaneSlot& last) {
    for (unsigned lane = 0; lane < kWarpSize; ++lane) {
      if ((group & (1u << lane)) == 0) continue;
      const LaneSlot& s = w.lane[lane];
      if (s.compute != last.compute)
        fail("%s meets %s in lane %u: lanes of one mask must call the same warp intrinsic",
             last.name, s.name, lane);
      if (s.mask != last.mask)
        fail("%s: lane %u uses mask 0x%08x, another lane 0x%08x; a mask must be the same "
             "in every lane it names",
             last.name, lane, s.mask, last.mask);
    }
    last.compute(w, group);
    w.arrived &= ~group;
    for (unsigned k = 0; k < kWarpSize; ++k) {
      const unsigned lane = shape_->reversed_threads ? kWarpSize - 1 - k : k;
      if ((group & (1u << lane)) == 0) continue;
      Fiber& f = fibers_[warp * kWarpSize + lane];
      f.state = FiberState::runnable;
      push(f.linear);
    }
  }

  void thread_exited(Fiber& f) {
    f.state = FiberState::exited;
    warps_[f.linear / kWarpSize].exited |= 1u << (f.linear % kWarpSize);
    ++exited_;
    --live_;
    // A thread that returned no longer takes part in __syncthreads (as on the GPU, where the
    // barrier counts the threads that have not exited).
    if (barrier_arrived_ != 0 && barrier_arrived_ == live_) release_barrier();
    try_release_activemask(f.linear / kWarpSize);
  }

  // Releases the lanes waiting in __activemask() once no lane of the warp can still arrive
  // there: every other lane has returned or waits at a barrier or another warp intrinsic.
  void try_release_activemask(unsigned warp) {
    WarpState& w = warps_[warp];
    if (w.activemask == 0) return;
    const unsigned undecided = w.existing & ~w.exited & ~w.activemask & ~w.arrived;
    for (unsigned lane = 0; lane < kWarpSize; ++lane)
      if ((undecided & (1u << lane)) &&
          fibers_[warp * kWarpSize + lane].state != FiberState::at_barrier)
        return;
    const unsigned lanes = w.activemask;
    w.activemask = 0;
    for (unsigned k = 0; k < kWarpSize; ++k) {
      const unsigned lane = shape_->reversed_threads ? kWarpSize - 1 - k : k;
      if ((lanes & (1u << lane)) == 0) continue;
      std::memcpy(w.lane[lane].out, &lanes, sizeof lanes);
      Fiber& f = fibers_[warp * kWarpSize + lane];
      f.state = FiberState::runnable;
      push(f.linear);
    }
  }

  void report_deadlock() {
    unsigned at_barrier = 0, at_warp = 0;
    for (unsigned i = 0; i < nthreads_; ++i) {
      at_barrier += fibers_[i].state == FiberState::at_barrier;
      at_warp += fibers_[i].state == FiberState::at_warp_op;
    }
    const uint3 bi = builtins.block_idx;
    int n = std::snprintf(message_, kMessageBytes,
                          "deadlock in block (%u,%u,%u): %u threads wait in __syncthreads(), "
                          "%u wait in warp intrinsics, %u have returned",
                          bi.x, bi.y, bi.z, at_barrier, at_warp, exited_);
    for (unsigned w = 0; w * kWarpSize < nthreads_ && n > 0 && size_t(n) < kMessageBytes; ++w) {
      const WarpState& ws = warps_[w];
      if (ws.activemask != 0) {
        std::snprintf(message_ + n, kMessageBytes - size_t(n),
                      "; warp %u: lanes 0x%08x wait in __activemask()", w, ws.activemask);
        break;
      }
      if (ws.arrived == 0) continue;
      const unsigned first = unsigned(__builtin_ctz(ws.arrived));
      const LaneSlot& s = ws.lane[first];
      const unsigned missing = (s.mask & ws.existing) & ~ws.arrived;
      std::snprintf(message_ + n, kMessageBytes - size_t(n),
                    "; warp %u: lanes 0x%08x wait in %s (mask 0x%08x), lanes 0x%08x of the mask "
                    "never arrived (0x%08x of them returned)",
                    w, ws.arrived, s.name, s.mask, missing, missing & ws.exited);
      break;
    }
    failed_ = true;
  }

  const LaunchShape* shape_ = nullptr;
  std::unique_ptr<Fiber[]> fibers_;
  std::unique_ptr<WarpState[]> warps_;
  std::unique_ptr<unsigned[]> queue_;
  unsigned capacity_ = 0;
  size_t stack_size_ = 0;
  bool stacks_dirty_ = false;

  unsigned nthreads_ = 0;
  unsigned live_ = 0;
  unsigned exited_ = 0;
  unsigned barrier_arrived_ = 0;
  unsigned barrier_true_ = 0;
  BarrierResult last_barrier_{0, 0};
  unsigned queue_head_ = 0;
  unsigned queue_count_ = 0;

  Context sched_ctx_{};
  void* sched_fake_stack_ = nullptr;
  const void* sched_stack_bottom_ = nullptr;
  size_t sched_stack_size_ = 0;

  bool failed_ = false;
  char message_[kMessageBytes] = {};
};

// The executor of the calling fiber; a device function called outside a launch has none.
inline Executor& current_executor() {
  Executor* ex = builtins.exec;
  if (ex == nullptr || builtins.fiber == nullptr) {
    std::fprintf(stderr, "cuda_host: a CUDA intrinsic was called outside a kernel launch\n");
    std::abort();
  }
  return *ex;
}

// ---------------------------------------------------------------------------------------
// The grid: blocks are taken from a shared counter by one or more OS threads.

// Persistent worker threads, so that a launch does not pay for thread creation and each
// worker keeps its fiber stacks warm.  Leaked on purpose: the threads are detached and block
// on its condition variable until the process ends.  A forked child gets a fresh pool.
class WorkerPool {
 public:
  static WorkerPool& instance() {
    static std::mutex guard;
    static WorkerPool* pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lock(guard);
    if (pool == nullptr || owner != getpid()) {
      pool = new WorkerPool;
      owner = getpid();
    }
    return *pool;
  }

  // Runs job(ctx) on `workers` threads, the caller being one of them, and waits for all.
  // Returns false without running anything if another launch holds the pool.
  bool try_run(unsigned workers, void (*job)(void*), void* ctx) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    const unsigned helpers = workers - 1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (threads_ < helpers) {
        std::thread(&WorkerPool::loop, this, threads_, generation_).detach();
        ++threads_;
      }
      job_ = job;
      ctx_ = ctx;
      wanted_ = helpers;
      pending_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    job(ctx);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    return true;
  }

 private:
  WorkerPool() = default;

  void loop(unsigned index, uint64_t seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= wanted_) continue;
      void (*job)(void*) = job_;
      void* ctx = ctx_;
      lock.unlock();
      job(ctx);
      lock.lock();
      if (--pending_ == 0) done_.notify_all();
    }
  }

  std::mutex busy_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  unsigned threads_ = 0;
  uint64_t generation_ = 0;
  unsigned wanted_ = 0;
  unsigned pending_ = 0;
  void (*job_)(void*) = nullptr;
  void* ctx_ = nullptr;
};

struct GridRun {
  const LaunchShape* shape;
  uint64_t nblocks;
  bool reversed_blocks;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex message_mutex;
  char message[kMessageBytes] = {};

  static void work(void* self) {
    GridRun& run = *static_cast<GridRun*>(self);
    Executor& ex = Executor::for_this_thread();
    for (;;) {
      const uint64_t k = run.next.fetch_add(1);
      if (k >= run.nblocks || run.failed.load(std::memory_order_relaxed)) return;
      const uint64_t block = run.reversed_blocks ? run.nblocks - 1 - k : k;
      if (!ex.run_block(*run.shape, block)) {
        std::lock_guard<std::mutex> lock(run.message_mutex);
        if (!run.failed.exchange(true)) std::snprintf(run.message, kMessageBytes, "%s", ex.message());
        return;
      }
    }
  }
};

// Runs every block of the grid; returns false with `message` on a kernel failure.
inline bool run_grid(const LaunchShape& shape, bool reversed_blocks, unsigned num_threads,
                     char* message, size_t message_size) {
  GridRun run;
  run.shape = &shape;
  run.nblocks = uint64_t(shape.grid.x) * shape.grid.y * shape.grid.z;
  run.reversed_blocks = reversed_blocks;
  unsigned workers = num_threads != 0 ? num_threads : std::thread::hardware_concurrency();
  if (workers == 0) workers = 1;
  if (uint64_t(workers) > run.nblocks) workers = unsigned(run.nblocks);
  if (workers <= 1 || !WorkerPool::instance().try_run(workers, &GridRun::work, &run))
    GridRun::work(&run);
  if (run.failed.load()) {
    std::snprintf(message, message_size, "%s", run.message);
    return false;
  }
  return true;
}

}  // namespace detail
}  // namespace cuda_host
