"""yxanul: train small language models with DeepSeek-V3-style fine-grained FP8 mixed precision."""
__version__ = "0.1.0"
