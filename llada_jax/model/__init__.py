"""The model: architecture config, the Flax transformer (bidirectional LLaDA or causal teacher),
attention kernels, and HF weight conversion (safetensors <-> layer-stacked params)."""
