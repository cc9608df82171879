// cuda_host_cuda_std.h: libcu++'s cuda::std (CCCL) is the C++ standard library on the host.
#pragma once
namespace cuda {
namespace std = ::std;
}
