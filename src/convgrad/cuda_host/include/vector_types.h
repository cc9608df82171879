// vector_types.h for the host emulation: everything lives in the force-included cuda_host.h.
#pragma once
#include "cuda_host.h"
