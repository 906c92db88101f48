"""The benchmark: our real steps beside the PyTorch twin (:mod:`~flax_resnet.benchmark.torch_twin`), the loop's
overhead, the main job end to end beside a plain PyTorch loop (:mod:`~flax_resnet.benchmark.job`), and inference speed beside the ONNX export and PyTorch eager (:mod:`~flax_resnet.benchmark.inference`)."""

from flax_resnet.benchmark.job import JOB_KEYS, format_job_summary, run_job_race
from flax_resnet.benchmark.inference import INFERENCE_KEYS, format_inference_summary, run_inference_benchmark
from flax_resnet.benchmark.loop import LOOP_KEYS, format_loop_summary, loop_overhead
from flax_resnet.benchmark.run import RESULT_KEYS, format_summary, interleaved, run_benchmark
from flax_resnet.benchmark.runners import DTYPES, BenchmarkConfig, Runner, build_ours, build_torch

__all__ = ["DTYPES", "INFERENCE_KEYS", "JOB_KEYS", "LOOP_KEYS", "RESULT_KEYS", "BenchmarkConfig", "Runner", "build_ours",
           "build_torch", "format_inference_summary", "format_job_summary", "format_loop_summary", "format_summary", "interleaved", "loop_overhead",
           "run_benchmark", "run_inference_benchmark", "run_job_race"]
