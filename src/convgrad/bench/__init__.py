"""``convgrad bench``: time the three passes on built-in layer suites, beside PyTorch.

For every layer of the chosen suites, every pass and every backend, the benchmark

1. makes Gaussian inputs on the host and copies them to the backend's arrays;
2. runs the pass once and checks the result against the reference (PyTorch when it is the
   reference, else ``convgrad.testing.reference_*`` on the first image);
3. times it: on the CPU the median of ``time.perf_counter`` over the repeats; on a GPU the
   median of CUDA-event times, after a warm-up, with the L2 cache flushed (a 256 MiB buffer
   written) before every repeat;
4. reports time, TFLOP/s (``problem.flops(pass) / time``), GB/s (``problem.bytes(pass) /
   time``), the fraction of the device's roofline and the ratio to the reference.

The ratio is ``reference_time / backend_time``: above 1 means convgrad is faster than the
reference, below 1 slower.  The roofline is ``min(peak, bandwidth * flops / bytes)``, with the
peak and the bandwidth measured at start-up by a GEMM and a copy (NumPy on the CPU; CuPy,
else PyTorch, on a GPU), never taken from a table.

GPU kernel time and launch overhead are reported apart.  Before each timed repeat a
"spin" kernel that busy-waits a fixed number of clock cycles holds the GPU while the host
issues the call, so the events bracket only the kernels (``time_s``).  A second loop times
the call from the host with a synchronisation after it (``wall_s``); the difference is the
host-side cost of the call (checks, planning, launches) that the GPU sat idle for
(``launch_overhead_s``).  The cost of one empty kernel launch is recorded per device.

Only real backends are benchmarked; emulated ones (``cupy-host``, the Numba simulator) are
refused.  This package imports neither PyTorch, CuPy nor Numba until they are needed.

One job per module; imports run down this list, never up it:

- ``cli``: the subcommand's arguments and the run from arguments to output;
- ``report``: the table, the JSON document and the plot of a finished run;
- ``runner``: :class:`Bench`, which sets up each device and makes one checked, timed record
  per layer, pass and backend;
- ``check``: the correctness check before timing; ``cases``: one layer's data and the calls
  that run a pass on convgrad or PyTorch; ``arrays``: host data and its copies per library;
- ``suites``: the layer suites; ``timing``: CPU and GPU timers, the L2 flush, the settle
  pause, contention; ``roofline``: peaks and bandwidths; ``environment``: names, versions,
  thread pools, load and the git commit.
"""

from .cli import DTYPES, add_arguments, options_from_args, run
from .environment import cpu_name, load_average, thread_pools
from .report import print_table, write_json, write_plot
from .runner import RATIO_DEFINITION, RECORD_FIELDS, Bench, Options
from .suites import SUITES, Layer, Suite
from .timing import CPU_SETTLE_S, Contention, CpuTimer, GpuTimer, Timing

__all__ = [
    "CPU_SETTLE_S", "DTYPES", "RATIO_DEFINITION", "RECORD_FIELDS", "SUITES", "Bench", "Contention", "CpuTimer",
    "GpuTimer", "Layer", "Options", "Suite", "Timing", "add_arguments", "cpu_name", "load_average",
    "options_from_args", "print_table", "run", "thread_pools", "write_json", "write_plot",
]
