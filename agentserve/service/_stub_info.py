"""Written by gen_stubs.py with the stubs: what they were generated from."""

PROTO_SHA256 = "0f83a6e1084c64077170bb73abc4f5eba458d693534acd664cefa0d7077b7476"
GRPCIO_TOOLS_VERSION = "1.84.0"
