"""jdit.profile attributes trace events to HLO instructions on CPU traces and on GPU traces."""
import pytest
from jax._src.lib import _profile_data

from jdit import profile

# A GPU trace as XLA writes one: kernels on the device plane carry the instruction in an "hlo_op" stat (cuBLAS
# here) or in their name with "." written "_" (XLA's own fusions); the host plane holds the launches.
GPU_TRACE = """
planes {
  id: 1 name: "/device:GPU:0"
  lines { id: 1 name: "Stream #13(compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 5000000 stats { metadata_id: 10 str_value: "custom-call.3" } }
    events { metadata_id: 2 offset_ps: 6000000 duration_ps: 2000000 }
    events { metadata_id: 2 offset_ps: 9000000 duration_ps: 1000000 }
    events { metadata_id: 3 offset_ps: 11000000 duration_ps: 500000 }
  }
  event_metadata { key: 1 value { id: 1 name: "sm90_xmma_gemm_bf16bf16_bf16f32" } }
  event_metadata { key: 2 value { id: 2 name: "loop_add_fusion_12" } }
  event_metadata { key: 3 value { id: 3 name: "memset32_kernel" } }
  stat_metadata { key: 10 value { id: 10 name: "hlo_op" } }
}
planes {
  id: 2 name: "/host:CPU"
  lines { id: 1 name: "python" events { metadata_id: 1 duration_ps: 9000000 } }
  event_metadata { key: 1 value { id: 1 name: "loop_add_fusion.12" } }
}
"""
CPU_TRACE = """
planes {
  id: 1 name: "/host:CPU"
  lines { id: 1 name: "XLA thread" events { metadata_id: 1 duration_ps: 4000000 } events { metadata_id: 2 duration_ps: 1000 } }
  event_metadata { key: 1 value { id: 1 name: "dot.1" } }
  event_metadata { key: 2 value { id: 2 name: "ParseArguments" } }
}
"""


def test_gpu_kernels_count_by_their_instruction_and_host_launches_do_not():
  names = {"custom-call.3", "loop_add_fusion.12", "dot.1"}
  durations, unmatched = profile.op_durations([_profile_data.ProfileData.from_text_proto(GPU_TRACE)], names)
  assert durations == {"custom-call.3": 5000.0, "loop_add_fusion.12": 3000.0}  # ns; the 9 us host launch is not
  assert unmatched == pytest.approx(500.0)  # the memset: device time of no instruction
  durations, unmatched = profile.op_durations([_profile_data.ProfileData.from_text_proto(CPU_TRACE)], names)
  assert durations == {"dot.1": 4000.0} and unmatched == 0.0  # CPU: the host's thunk events, nothing unmatched


def test_the_table_says_how_much_device_time_no_instruction_names():
  result = profile.summarize([(2.0, "dot.1", "matmul", "fc1")], 0.003, unmatched_ms=0.5)
  assert result["unmatched_ms"] == 0.5 and result["categories"]["matmul"]["share"] == 1.0
  assert "not matched" in profile.format_table(result)
  assert "not matched" not in profile.format_table(profile.summarize([(2.0, "dot.1", "matmul", "fc1")], 0.003))
