"""Where a decode step runs: the exact Q4_1/Q8_0 low-bit kernel and the generation-only model copy
(``lowbit``, C++ in ``csrc/``), the fused decode step for Llama models on that kernel (``llama_step``), and the
CUDA-graph step over a static KV cache (``cuda_graphs``). Each must give the plain forward's tokens."""
