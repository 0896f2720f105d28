"""The ONNX Runtime GenAI model: build (model builder), multi-LoRA graph and adapters, checks against torch."""
