"""Our own Llama-family model code (layers, architectures) and the loader that fills it.

transformers supplies configs, tokenizers and checkpoint conventions; the forward is ours.
"""
