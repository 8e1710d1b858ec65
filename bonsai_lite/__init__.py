"""bonsai_lite: structured pruning of LLMs with forward passes only (Bonsai), layer-streamed."""
import os

__version__ = "0.1.0"

# Transparent huge pages for torch's large host tensors (c10's THP_MEM_ALLOC_ENABLE: allocations of
# 2 MiB and more are 2 MiB-aligned and madvise(MADV_HUGEPAGE)d, where the kernel allows it). A CPU
# run streams every weight through fresh buffers (`search.machine.bound_host_allocator`), and with
# 4 KiB pages their faults ran at 2.1-2.4 GB/s on the EPYC VM, against 8-9 GB/s with huge pages
# (`search.machine.fresh_page_probe`, which the planner prices them with). torch reads the variable
# once, at its first host allocation, so it is set before anything here imports torch; 0 opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
