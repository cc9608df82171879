// mma.h for the host emulation: nvcuda::wmma as cuda_host_wmma.h emulates it.
#pragma once
#include "cuda_host.h"
#include "cuda_host_wmma.h"
