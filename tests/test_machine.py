import json

import torch

from memoir.machine import cpu_flags, cpu_model, machine_info

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse2 popcnt avx2 avx512f avx512_vpopcntdq sha_ni

processor\t: 1
model name\t: AMD EPYC 7B13 64-Core Processor
"""


def test_cpuinfo_parsing_takes_the_first_cpu_and_only_the_kernel_relevant_flags():
    assert cpu_model(CPUINFO) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_flags(CPUINFO) == ["avx2", "avx512_vpopcntdq", "avx512f", "popcnt"]
    # no /proc/cpuinfo fields (other OS): a name from platform, no flags, no error
    assert cpu_model("") and cpu_flags("") == []


def test_machine_info_is_json_ready_and_records_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        info = machine_info("cpu")
    finally:
        torch.set_num_threads(before)
    assert info["torch_threads"] == 1
    assert info["gpu"] is None  # asked for the CPU: no card even where CUDA is visible
    assert info["torch"] == torch.__version__
    json.dumps(info)
