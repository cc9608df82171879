// cuda_host_launch.h: the C entry point of a compiled kernel library.
//
// The generated translation unit (build.py) defines, for each name expression,
//
//     extern "C" int cuda_host_kernel_<i>(const cuda_host::LaunchRequest* request) {
//       return cuda_host::detail::launch(&<name expression>, request);
//     }
//
// launch() deduces the kernel's parameter types from the function pointer, checks the
// argument count, sizes and pointer-ness against what Python marshalled, and runs the grid
// with each thread calling the kernel on copies of the arguments (kernel parameters are
// per-thread values in CUDA too).
#pragma once

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <utility>

#include "cuda_host_runtime.h"

namespace cuda_host {

// Mirrored field by field by runner.py (_LaunchRequest); change both and kAbiVersion together.
struct LaunchRequest {
  void* const* args;              // args[i] points at the storage of parameter i
  const uint64_t* arg_sizes;      // bytes Python marshalled for parameter i
  const uint8_t* arg_is_pointer;  // 1 where an array (or None) was given
  uint32_t nargs;
  uint32_t grid[3];
  uint32_t block[3];
  uint64_t shared_mem;
  int32_t reversed_blocks;
  int32_t reversed_threads;
  uint32_t num_threads;  // OS threads for the grid; 0: one per hardware thread
  uint64_t stack_size;   // bytes per fiber stack
  char* message;         // receives the reason for a non-zero status
  uint64_t message_size;
};

constexpr int kAbiVersion = 1;
constexpr int kLaunchOk = 0;
constexpr int kLaunchKernelFailed = 1;
constexpr int kLaunchBadArguments = 2;
constexpr int kLaunchBadConfiguration = 3;

namespace detail {

template <class... P>
struct KernelCall {
  void (*kernel)(P...);
  void* const* args;
};

template <class... P, size_t... I>
void call_kernel(const KernelCall<P...>& call, std::index_sequence<I...>) {
  call.kernel(*static_cast<const P*>(call.args[I])...);
}

template <class... P>
void invoke_kernel(const void* closure) {
  call_kernel(*static_cast<const KernelCall<P...>*>(closure), std::index_sequence_for<P...>{});
}

__attribute__((format(printf, 3, 4))) inline int launch_error(const LaunchRequest* request,
                                                              int status, const char* format,
                                                              ...) {
  if (request->message != nullptr && request->message_size != 0) {
    va_list ap;
    va_start(ap, format);
    std::vsnprintf(request->message, request->message_size, format, ap);
    va_end(ap);
  }
  return status;
}

template <class... P>
int launch(void (*kernel)(P...), const LaunchRequest* request) {
  static_assert(!(std::is_reference<P>::value || ...), "kernel parameters cannot be references");
  constexpr size_t nparams = sizeof...(P);
  const uint64_t sizes[] = {uint64_t(sizeof(P))..., 0};
  const bool pointers[] = {std::is_pointer<P>::value..., false};
  if (request->nargs != nparams)
    return launch_error(request, kLaunchBadArguments, "the kernel takes %zu arguments, %u given",
                        nparams, request->nargs);
  for (size_t i = 0; i < nparams; ++i) {
    const bool given_pointer = request->arg_is_pointer[i] != 0;
    if (pointers[i] != given_pointer)
      return launch_error(request, kLaunchBadArguments,
                          "argument %zu: the kernel parameter is %s, but %s was given", i,
                          pointers[i] ? "a pointer" : "a value", given_pointer ? "an array" : "a scalar");
    if (sizes[i] != request->arg_sizes[i])
      return launch_error(request, kLaunchBadArguments,
                          "argument %zu: the kernel parameter has %llu bytes, the argument %llu",
                          i, (unsigned long long)sizes[i],
                          (unsigned long long)request->arg_sizes[i]);
  }
  const uint64_t threads = uint64_t(request->block[0]) * request->block[1] * request->block[2];
  if (threads == 0 || threads > 1024 || request->grid[0] == 0 || request->grid[1] == 0 ||
      request->grid[2] == 0)
    return launch_error(request, kLaunchBadConfiguration, "empty grid or block, or a block of %llu > 1024 threads",
                        (unsigned long long)threads);
  if (request->shared_mem > CUDA_HOST_MAX_DYNAMIC_SHARED_BYTES)
    return launch_error(request, kLaunchBadConfiguration,
                        "shared_mem %llu exceeds the emulation's %d bytes",
                        (unsigned long long)request->shared_mem, CUDA_HOST_MAX_DYNAMIC_SHARED_BYTES);

  const KernelCall<P...> call{kernel, request->args};
  LaunchShape shape;
  shape.grid = dim3(request->grid[0], request->grid[1], request->grid[2]);
  shape.block = dim3(request->block[0], request->block[1], request->block[2]);
  shape.shared_mem = size_t(request->shared_mem);
  shape.reversed_threads = request->reversed_threads != 0;
  shape.stack_size = size_t(request->stack_size);
  shape.invoke = &invoke_kernel<P...>;
  shape.closure = &call;
  if (!run_grid(shape, request->reversed_blocks != 0, request->num_threads, request->message,
                size_t(request->message_size)))
    return kLaunchKernelFailed;
  return kLaunchOk;
}

}  // namespace detail
}  // namespace cuda_host
