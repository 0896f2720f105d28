"""Terminal chat on the ONNX Runtime GenAI model, with live LoRA adapter switching (`python -m chat`)."""
