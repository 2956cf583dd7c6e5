"""KServe v2 / Triton protocol modules generated from the .proto files beside them."""
