"""Linear methods: how a linear layer stores its weight and multiplies by it.

The layers call one interface (``base.LinearMethod``); the unquantized method is the default,
and fp8 or a LoRA wrapper are further implementations of the same interface. Nothing is
imported here, so the layers can import one method without pulling in the others.
"""
