"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "27b61f02c0b28664622bb31804fa971ca93fa5579b976d12dc888d28423ad3d1"
GRPCIO_TOOLS_VERSION = "1.84.0"
