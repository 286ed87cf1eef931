"""The compression methods: importance, structural pruning, recovery, quantization, visual tokens."""
