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


def test_gpu_peak_bandwidth_takes_the_most_specific_card_name():
    from memoir.machine import gpu_peak_gbps

    assert gpu_peak_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert gpu_peak_gbps("NVIDIA H100 PCIe") == 2000.0
    assert gpu_peak_gbps("NVIDIA H100 NVL") == 3900.0
    assert gpu_peak_gbps("NVIDIA GH200 480GB") == 4000.0  # not the H200 its name contains
    assert gpu_peak_gbps("NVIDIA H200") == 4800.0
    assert gpu_peak_gbps("NVIDIA A100 80GB PCIe") == 1935.0
    assert gpu_peak_gbps("NVIDIA A100-SXM4-80GB") == 2039.0
    assert gpu_peak_gbps("NVIDIA A100-SXM4-40GB") == 1555.0
    assert gpu_peak_gbps("NVIDIA L40S") == 864.0 and gpu_peak_gbps("NVIDIA L4") == 300.0
    assert gpu_peak_gbps("Some Future Card") is None
