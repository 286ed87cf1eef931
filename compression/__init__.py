"""MLLM Compression Studio: structural pruning, recovery, quantization and visual-token pruning
for LLaVA-style multimodal models. This package never imports streamlit."""
