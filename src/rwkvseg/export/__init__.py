"""Export: trained models to ONNX (and torch.export programs) with the preprocessing record inside, their
verification against PyTorch, and an onnxruntime predictor that needs nothing but the exported file."""
